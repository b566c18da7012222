"""Benchmark masked conv2d: dense (cuDNN on CUDA, oneDNN on CPU), mask-multiply each forward, lthfast.

Conv shapes of ResNet-18 (CIFAR and ImageNet) and VGG-16 (CIFAR); sparsity x mask layout; forward and a full
training step (forward + dX, dW, db). Every provider's outputs are checked against the float64 reference before
it is timed. CUDA: ``triton.testing.do_bench`` (median); CPU: ``torch.utils.benchmark`` (median). Inputs rotate
over pre-drawn random buffers (64 MiB in all, as ``lthfast.bench.timing.buffer_count`` draws them: 4 to 64 sets)
so repeated calls do not re-read a warm cache.

    python benchmarks/bench_masked_conv.py --out benchmarks/results/masked_conv-cpu.json
    python benchmarks/bench_masked_conv.py --nets resnet18-cifar --batch 128 256 --dtype bfloat16   # on a GPU

Without --out nothing is written; an existing --out file is replaced only with --force.

Providers:
  dense           F.conv2d on the dense W*M (prepared once): what training costs with no sparsity support
  mask-multiply   F.conv2d(x, W * M) recomputing the product each call, as torch.nn.utils.prune does
  lthfast         lthfast.functional.masked_conv2d on the "auto" backend (dense below the crossover density)
  lthfast-triton  the same on the "triton" backend: the kernels at every density (CUDA only); used to measure
                  the tile-density crossover that lthfast.ops.conv.DENSE_TILE_DENSITY should hold
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import lthfast
from lthfast import _backend, functional
from lthfast.bench import results as bench_results
from lthfast.bench import timing
from lthfast.bench.masks import check_sweep
from lthfast.ops import conv as conv_op

# (name, Cin, Cout, kernel, stride, padding, input H=W): each distinct conv of the network once
NETS = {
    "resnet18-cifar": [
        ("conv1", 3, 64, 3, 1, 1, 32), ("layer1", 64, 64, 3, 1, 1, 32),
        ("layer2.0", 64, 128, 3, 2, 1, 32), ("layer2", 128, 128, 3, 1, 1, 16), ("layer2.down", 64, 128, 1, 2, 0, 32),
        ("layer3.0", 128, 256, 3, 2, 1, 16), ("layer3", 256, 256, 3, 1, 1, 8), ("layer3.down", 128, 256, 1, 2, 0, 16),
        ("layer4.0", 256, 512, 3, 2, 1, 8), ("layer4", 512, 512, 3, 1, 1, 4), ("layer4.down", 256, 512, 1, 2, 0, 8),
    ],
    "resnet18-imagenet": [
        ("conv1", 3, 64, 7, 2, 3, 224), ("layer1", 64, 64, 3, 1, 1, 56),
        ("layer2.0", 64, 128, 3, 2, 1, 56), ("layer2", 128, 128, 3, 1, 1, 28), ("layer2.down", 64, 128, 1, 2, 0, 56),
        ("layer3.0", 128, 256, 3, 2, 1, 28), ("layer3", 256, 256, 3, 1, 1, 14), ("layer3.down", 128, 256, 1, 2, 0, 28),
        ("layer4.0", 256, 512, 3, 2, 1, 14), ("layer4", 512, 512, 3, 1, 1, 7), ("layer4.down", 256, 512, 1, 2, 0, 14),
    ],
    "vgg16-cifar": [
        ("conv1_1", 3, 64, 3, 1, 1, 32), ("conv1_2", 64, 64, 3, 1, 1, 32), ("conv2_1", 64, 128, 3, 1, 1, 16),
        ("conv2_2", 128, 128, 3, 1, 1, 16), ("conv3_1", 128, 256, 3, 1, 1, 8), ("conv3_2", 256, 256, 3, 1, 1, 8),
        ("conv4_1", 256, 512, 3, 1, 1, 4), ("conv4_2", 512, 512, 3, 1, 1, 4), ("conv5", 512, 512, 3, 1, 1, 2),
    ],
}  # fmt: skip
PROVIDERS = ("dense", "mask-multiply", "lthfast", "lthfast-triton")
LAYOUTS = ("unstructured", "channel-block-16", "channel-block-32", "channel-block-64", "tile-block")
SPARSITIES = (0.0, 0.8, 0.9, 0.95, 0.98)
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # relative to the output's scale
# Dense peak FLOP/s and bandwidth (B/s) for the floor: H100 SXM5 and H200 datasheet figures (no sparsity).
PEAKS = {"H100": {"tensor": 989e12, "tf32": 494e12, "fp32": 67e12, "bw": 3.35e12},
         "H200": {"tensor": 989e12, "tf32": 494e12, "fp32": 67e12, "bw": 4.8e12}}  # fmt: skip


def make_mask(layout: str, sparsity: float, shape, device, gen: torch.Generator) -> torch.Tensor:
    """A random bool mask [Cout, Cin, kh, kw] with exactly round(sparsity * units) pruned units of the layout."""
    cout, cin, kh, kw = shape
    if layout == "unstructured":
        rows, cols, bn, bc = cout, cin * kh * kw, 1, 1
    else:
        if layout == "tile-block":
            bn, bc = lthfast_tiles(device)
        else:
            bn = bc = int(layout.rsplit("-", 1)[1])
        rows, cols = cout, cin
    tr, tc = -(-rows // bn), -(-cols // bc)
    alive = torch.ones(tr * tc, dtype=torch.bool)
    alive[torch.randperm(tr * tc, generator=gen)[: round(sparsity * tr * tc)]] = False
    full = alive.view(tr, tc).repeat_interleave(bn, 0).repeat_interleave(bc, 1)[:rows, :cols]
    mask = full.reshape(shape) if layout == "unstructured" else full[:, :, None, None].expand(shape)
    return mask.contiguous().to(device)


def lthfast_tiles(device) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_C) of lthfast's conv kernels on ``device``: the tile-block layout's unit."""
    if _backend.triton_available():
        from lthfast.kernels.masked_conv import conv_tiles

        return conv_tiles(torch.device(device))
    return 16, 16


def tile_density(mask: torch.Tensor) -> float:
    from lthfast.indexing.tiles import build_tile_index

    bn, bc = lthfast_tiles(mask.device)
    n, _, kh, kw = mask.shape
    return build_tile_index(mask.reshape(n, -1), bn, bc * kh * kw).tile_density


def provider_fn(name: str, w: torch.Tensor, m: torch.Tensor, b: torch.Tensor, conv: dict):
    """A function x -> y computing the layer, with any per-layer preparation done here (once)."""
    if name == "dense":
        wd = torch.where(m, w, 0).detach().requires_grad_(w.requires_grad)
        return lambda x: F.conv2d(x, wd, b, **conv), (wd, b)
    if name == "mask-multiply":
        mf = m.to(w.dtype)
        return lambda x: F.conv2d(x, w * mf, b, **conv), (w, b)
    backend = "triton" if name == "lthfast-triton" else "auto"

    def call(x):
        with lthfast.backend(backend):
            return functional.masked_conv2d(x, w, m, b, **conv)

    return call, (w, b)


def step_fn(fn, params, mode: str):
    """forward: y; train: (y, dX, dW, db) via autograd.grad so nothing accumulates between calls."""
    if mode == "forward":

        def forward(x, g):
            with torch.no_grad():
                return (fn(x),)

        return forward

    def train(x, g):
        y = fn(x)
        return (y, *torch.autograd.grad(y, (x, *params), g))

    return train


def reference_step(x, g, w, m, b, conv: dict, mode: str) -> list[torch.Tensor]:
    """The float64 outputs every provider is checked against (dW of W*M: zero where the mask is False)."""
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    out = step_fn(lambda x_: F.conv2d(x_, torch.where(m, wr, 0), br, **conv), (wr, br), mode)(xr, g.double())
    return [t.detach() for t in out]


def check(outputs, reference, dtype, what: str) -> float:
    """Largest error relative to each tensor's scale; raises past the dtype's tolerance."""
    worst = 0.0
    for got, ref in zip(outputs, reference):
        scale = max(1.0, ref.abs().max().item())
        err = (got.double() - ref).abs().max().item() / scale
        worst = max(worst, err)
        if not err <= TOL[dtype]:
            raise AssertionError(f"{what}: error {err:.3g} of scale exceeds {TOL[dtype]:g}")
    return worst


def time_ms(fn, sets, device, cuda_graph: bool = False) -> float:
    it = itertools.cycle(sets)
    call = lambda: fn(*next(it))
    if cuda_graph:  # each input set's step captured once, then replayed (lthfast.bench.timing.graphed)
        call = timing.graphed(fn, sets)
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median"))
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
    call()
    return timer.blocked_autorange(min_run_time=0.05).median * 1e3


def floor_ms(device, dtype, flops: float, nbytes: float) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAKS.items() if k in name), None)
    if peak is None:
        return None
    fp32 = "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    rate = peak[fp32] if dtype == torch.float32 else peak["tensor"]
    return max(flops / rate, nbytes / peak["bw"]) * 1e3


def bench_layer(args, net, layer, batch, device, dtype, gen) -> list[dict]:
    name, cin, cout, k, stride, pad, hw = layer
    conv = {"stride": stride, "padding": pad}
    shape = (cout, cin, k, k)
    w = (torch.randn(shape, generator=gen) / math.sqrt(cin * k * k)).to(device, dtype).requires_grad_()
    b = torch.randn(cout, generator=gen).to(device, dtype).requires_grad_()
    x0 = torch.randn(batch, cin, hw, hw, generator=gen).to(device, dtype)
    if args.memory_format == "channels_last":  # as model.to(memory_format=torch.channels_last) leaves a layer
        x0 = x0.to(memory_format=torch.channels_last)
        w = w.detach().to(memory_format=torch.channels_last).requires_grad_()
    y_shape = F.conv2d(x0[:1], w.detach(), None, **conv).shape[1:]
    set_bytes = (x0.numel() + batch * math.prod(y_shape)) * x0.element_size()
    count = timing.buffer_count(set_bytes)
    sets = [(x0,)] + [(torch.randn_like(x0),) for _ in range(count - 1)]
    sets = [(x.requires_grad_(), torch.randn((batch, *y_shape), device=device, dtype=dtype)) for (x,) in sets]
    rows_todo = [(0.0, "none")] + [(s, lay) for s in args.sparsity if s > 0 for lay in args.layouts]
    results = []
    for sparsity, layout in rows_todo:
        m = make_mask("unstructured" if layout == "none" else layout, sparsity, shape, device, gen)
        density, tiles = m.float().mean().item(), tile_density(m)
        for mode in args.modes:
            x, g = sets[0]
            ref = reference_step(x, g, w, m, b, conv, mode)
            flops = 2.0 * batch * math.prod(y_shape) * cin * k * k * (1 if mode == "forward" else 3)
            nbytes = (x.numel() + g.numel() + w.numel()) * x.element_size() * (1 if mode == "forward" else 3)
            row = {"net": net, "layer": name, "batch": batch, "cin": cin, "cout": cout, "kernel": k, "stride": stride,
                   "hw": hw, "mode": mode, "sparsity": sparsity, "layout": layout, "density": density,
                   "tile_density": tiles, "dense_gflop": flops / 1e9,
                   "floor_ms": floor_ms(device, dtype, flops, nbytes), "providers": {}}  # fmt: skip
            steps = {}
            for prov in args.providers:
                fn, params = provider_fn(prov, w, m, b, conv)
                steps[prov] = step_fn(fn, params, mode)
                out = list(steps[prov](x, g))
                if prov == "dense" and mode == "train":  # dense training computes dW everywhere; compare where alive
                    out[2] = torch.where(m, out[2], 0)
                err = check(out, ref, dtype, f"{net}/{name} {layout}@{sparsity} {mode} {prov}")
                row["providers"][prov] = {"max_rel_error": err, "rounds_ms": []}
            for _ in range(args.rounds):  # interleaved, so that a burst of load on the machine hits every provider
                for prov, step in steps.items():
                    row["providers"][prov]["rounds_ms"].append(time_ms(step, sets, device, args.cuda_graph))
            for result in row["providers"].values():
                result["ms"] = sorted(result["rounds_ms"])[len(result["rounds_ms"]) // 2]
            results.append(row)
            print_row(row, args.providers)
    return results


def print_row(row: dict, providers) -> None:
    base = row["providers"].get("dense", {}).get("ms")
    cells = []
    for prov in providers:
        ms = row["providers"][prov]["ms"]
        ratio = f" x{base / ms:5.2f}" if base else ""
        cells.append(f"{prov} {ms:8.3f}ms{ratio}")
    floor = f" floor {row['floor_ms']:.3f}ms" if row["floor_ms"] else ""
    print(
        f"{row['net']:>17} {row['layer']:>11} b{row['batch']:<3} {row['mode']:>7} {row['layout']:>16} "
        f"s={row['sparsity']:.2f} td={row['tile_density']:.2f} | " + " | ".join(cells) + floor,
        flush=True,
    )


def crossovers(rows: list[dict]) -> list[dict]:
    """Per layer and mode: the tile density below which the Triton kernels beat dense (linear interpolation
    over the tile-block rows, where the tile density is exact)."""
    out = []
    key = lambda r: (r["net"], r["layer"], r["batch"], r["mode"])
    for k, group in itertools.groupby(sorted(rows, key=key), key=key):
        pts = sorted(
            (r["tile_density"], r["providers"]["dense"]["ms"] / r["providers"]["lthfast-triton"]["ms"])
            for r in group
            if r["layout"] in ("tile-block", "none") and {"dense", "lthfast-triton"} <= set(r["providers"])
        )
        cross = None
        for (d0, s0), (d1, s1) in zip(pts, pts[1:]):
            if s0 >= 1.0 > s1:
                cross = d0 + (d1 - d0) * (s0 - 1.0) / (s0 - s1)
        if pts:
            out.append(dict(zip(("net", "layer", "batch", "mode"), k), points=pts, crossover_tile_density=cross))
    return out


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    ap.add_argument("--layers", nargs="+", default=None, help="only these layer names")
    ap.add_argument("--batch", nargs="+", type=int, default=[128, 256] if cuda else [2])
    # CPU defaults are cut so that a CPU run takes minutes: there lthfast runs the dense path at every density.
    ap.add_argument("--sparsity", nargs="+", type=float, default=list(SPARSITIES) if cuda else [0.0, 0.9])
    default_layouts = list(LAYOUTS) if cuda else ["unstructured", "channel-block-16", "tile-block"]
    ap.add_argument("--layouts", nargs="+", default=default_layouts, choices=LAYOUTS)
    ap.add_argument("--modes", nargs="+", default=["forward", "train"], choices=["forward", "train"])
    default_providers = ["dense", "mask-multiply", "lthfast"] + (["lthfast-triton"] if cuda else [])
    ap.add_argument("--providers", nargs="+", default=default_providers, choices=PROVIDERS)
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument(
        "--memory-format", default="channels_last" if cuda else "nchw", choices=["nchw", "channels_last"],
        help="of the inputs and weights (channels_last is the fast layout of cuDNN and of the lthfast kernels)",
    )  # fmt: skip
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--cuda-graph", action="store_true", help="CUDA: time each step captured as a CUDA graph")
    ap.add_argument("--rounds", type=int, default=1 if cuda else 3, help="interleaved timing rounds (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here (default: print only)")
    ap.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = ap.parse_args(argv)
    if args.cuda_graph and not args.device.startswith("cuda"):
        ap.error("--cuda-graph needs a CUDA device")
    if args.device.startswith("cuda") and not cuda:
        ap.error("--device cuda: no CUDA device is available")
    try:
        check_sweep("options", args.sparsity, [1], args.rounds)
        if args.out is not None:  # never overwrite a result silently; an unwritable path fails before the sweep
            bench_results.check_output([args.out], force=args.force)
    except ValueError as exc:
        ap.error(str(exc))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    info = _backend.describe()
    print(f"# {info['device']} torch {info['torch']} triton {info['triton']} {args.dtype} backend-default auto")
    rows = []
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench_masked_conv.py", *argv])
    meta = {**info, "command": command, "git": bench_results.git_info(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "timer": "triton.testing.do_bench median" if device.type == "cuda" else "torch.utils.benchmark median",
            "dense_tile_density_constant": conv_op.DENSE_TILE_DENSITY}  # fmt: skip

    def save(done: bool) -> None:  # after every layer, so that a run cut short still leaves its rows
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            doc = {"meta": meta | {"complete": done}, "rows": rows, "crossovers": crossovers(rows)}
            args.out.write_text(json.dumps(doc, indent=1))

    for net in args.nets:
        for layer in NETS[net]:
            if args.layers and layer[0] not in args.layers:
                continue
            for batch in args.batch:
                rows += bench_layer(args, net, layer, batch, device, dtype, gen)
                save(done=False)
    for c in crossovers(rows):
        if c["crossover_tile_density"] is not None:
            print(f"# crossover {c['net']}/{c['layer']} b{c['batch']} {c['mode']}: {c['crossover_tile_density']:.3f}")
    save(done=True)
    if args.out:
        print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
