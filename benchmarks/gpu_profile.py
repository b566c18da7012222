"""Where a masked training step spends its time on a GPU: the raw kernels against cuBLAS/cuDNN, the whole step,
the host syncs inside it, and a profiler table. A diagnostic for tuning, not a benchmark of record.

    python benchmarks/gpu_profile.py [--sparsity 0.9] [--block 32] [--what linear,conv]
"""

from __future__ import annotations

import argparse
import math
import traceback
import warnings

import torch
import torch.nn.functional as F
import triton.testing
from bench_masked_conv import make_mask  # benchmarks/ is this script's sys.path[0]

import lthfast
from lthfast import functional
from lthfast.bench.masks import block_mask
from lthfast.bench.timing import graphed


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def tflops(flop: float, ms: float) -> str:
    return f"{ms:7.3f} ms {flop / ms / 1e9:6.0f} TFLOP/s"


def syncs(step) -> None:
    """Run ``step`` once with CUDA sync debugging on and print where each host sync came from."""
    seen = []

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).splitlines()[0]
        if not text.startswith("Synchronization debug mode is a prototype"):  # torch's notice, not a sync
            seen.append((text, "".join(traceback.format_stack(limit=12)[:-1])))

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():  # restores showwarning on exit
            warnings.simplefilter("always")
            warnings.showwarning = show
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    print(f"  host syncs in one step: {len(seen)}")
    for message, stack in seen[:4]:
        print(f"  -- {message}\n{stack}")


def python_profile(step) -> None:
    """cProfile of 30 steps (after 3 warm ones): where the host's time per step goes."""
    import cProfile
    import pstats

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(30):
        step()
    torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(22)
    stats.sort_stats("cumulative").print_stats(30)


def profile(step) -> None:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as p:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = p.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60)
    print(table)
    table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60)
    print(table)


def report(args, rows, kernels, flop: float, sparse_flop: float, step, dense_step) -> None:
    """Time the raw kernels (``rows``: (name, flop, fn)), print the tuned configs, then the whole step against
    dense, its host syncs, and the profiles asked for."""
    # Each call timed eagerly and as a CUDA graph replay: the graph takes the host out, so the second figure is the
    # GPU's time, and where the first is larger the eager call was bound by host time.
    for name, fl, fn in rows:
        print(f"  {name:14s} {tflops(fl, bench(fn))} | graphed {tflops(fl, bench(graphed(fn, [()])))}")
    for name, tuned in kernels:  # lthfast.kernels.autotune.Tuned: the config of the key tuned last, its timings
        key = next(reversed(tuned.best), None)
        timings = [(*c.values(), round(ms, 4)) for c, ms in tuned.timings.get(key, [])]
        print(f"  best config {name}: {tuned.best.get(key)}; timed (config values, ms): {timings}")
    for name, fl, fn in (("step dense", 3 * flop, dense_step), ("step lthfast", 3 * sparse_flop, step)):
        print(f"  {name:14s} {tflops(fl, bench(fn))} | graphed {tflops(fl, bench(graphed(fn, [()])))}")
    syncs(step)
    if args.profile:
        profile(step)
    if args.cprofile:
        python_profile(step)


def each_sparsity(args, case) -> None:
    for sparsity in args.sparsity:
        try:
            case(sparsity)
        except Exception:  # noqa: BLE001 - a diagnostic: report and go on to the next case
            traceback.print_exc()


def linear(args) -> None:
    from lthfast.kernels import masked_matmul as mm

    m, n, k = 8192, 4096, 4096
    dt = torch.bfloat16
    x = torch.randn(m, k, device="cuda", dtype=dt)
    w = torch.randn(n, k, device="cuda", dtype=dt) / math.sqrt(k)
    g = torch.randn(m, n, device="cuda", dtype=dt)

    def case(sparsity: float) -> None:
        mask = block_mask(n, k, sparsity, args.block).cuda()
        index = mm.mask_tile_index(mask)
        flop = 2 * m * n * k
        sparse_flop = mm.flops(m, index)
        print(f"\n## linear {m}x{k} @ {n}x{k} bf16, sparsity {sparsity} in {args.block}-blocks: tile "
              f"{index.block_n}x{index.block_k}, {index.tile_density:.3f} of tiles alive")  # fmt: skip
        wm = w * mask
        rows = [
            ("fwd  cuBLAS", flop, lambda: x @ wm.t()),
            ("fwd  lthfast", sparse_flop, lambda: mm.masked_linear_forward(x, w, mask, None, index)),
            ("dX   cuBLAS", flop, lambda: g @ wm),
            ("dX   lthfast", sparse_flop, lambda: mm.masked_linear_grad_input(g, w, mask, index)),
            ("dW   cuBLAS", flop, lambda: g.t() @ x),
            ("dW   lthfast", sparse_flop, lambda: mm.masked_linear_grad_weight(g, x, mask, index)),
        ]
        xr = x.clone().requires_grad_()
        wr = w.clone().requires_grad_()
        wd = wm.clone().requires_grad_()  # the dense step's weight (W*M made once)
        kernels = (("fwd", mm._forward), ("dX", mm._grad_input), ("dW", mm._grad_weight))
        report(
            args, rows, kernels, flop, sparse_flop,
            step=lambda: functional.masked_linear(xr, wr, mask).backward(g),
            dense_step=lambda: F.linear(xr, wd).backward(g),
        )  # fmt: skip

    each_sparsity(args, case)


def conv(args) -> None:
    from lthfast.kernels import masked_conv as mc

    b, c, n, hw = 128, 256, 256, 14
    dt = torch.bfloat16
    x = torch.randn(b, c, hw, hw, device="cuda", dtype=dt).to(memory_format=torch.channels_last)
    w = (torch.randn(n, c, 3, 3, device="cuda", dtype=dt) / math.sqrt(9 * c)).to(memory_format=torch.channels_last)
    g = torch.randn(b, n, hw, hw, device="cuda", dtype=dt).to(memory_format=torch.channels_last)

    def case(sparsity: float) -> None:
        bn, bc = mc.conv_tiles(x.device)
        mask = make_mask("tile-block", sparsity, w.shape, x.device, torch.Generator().manual_seed(0))
        mask = mask.contiguous(memory_format=torch.channels_last)
        index = mc.conv_tile_index(mask)
        flop = 2 * b * hw * hw * n * c * 9
        sparse = flop * index.tile_density
        print(f"\n## conv 3x3 {c}->{n} {hw}x{hw} b{b} bf16 channels_last, tile-block sparsity {sparsity}: "
              f"{index.tile_density:.3f} of {bn}x{bc} tiles alive")  # fmt: skip
        wm = w * mask
        out = torch.empty_like(g)
        gx = torch.empty_like(x)
        gw = torch.zeros_like(w)
        pad = (1, 1, 1, 1)
        rows = [
            ("fwd  cuDNN", flop, lambda: F.conv2d(x, wm, padding=1)),
            ("fwd  lthfast", sparse, lambda: mc.conv2d_forward(x, w, mask, None, out, (1, 1), pad, (1, 1), index)),
            ("dX   cuDNN", flop, lambda: torch.ops.aten.convolution_backward(
                g, x, wm, None, (1, 1), (1, 1), (1, 1), False, [0, 0], 1, [True, False, False])),
            ("dX   lthfast", sparse, lambda: mc.conv2d_grad_input(g, w, mask, gx, (1, 1), pad, (1, 1), index)),
            ("dW   cuDNN", flop, lambda: torch.ops.aten.convolution_backward(
                g, x, wm, None, (1, 1), (1, 1), (1, 1), False, [0, 0], 1, [False, True, False])),
            ("dW   lthfast", sparse, lambda: mc.conv2d_grad_weight(g, x, mask, gw, (1, 1), pad, (1, 1), index)),
        ]  # fmt: skip
        xr = x.clone().requires_grad_()
        wr = w.clone().requires_grad_()
        wd = wm.clone().requires_grad_()  # the dense step's weight (W*M made once)
        report(
            args, rows, (("fwd", mc._fwd), ("dX", mc._dx), ("dW", mc._dw)), flop, sparse,
            step=lambda: functional.masked_conv2d(xr, wr, mask, padding=1).backward(g),
            dense_step=lambda: F.conv2d(xr, wd, padding=1).backward(g),
        )  # fmt: skip

    each_sparsity(args, case)


def bandwidths() -> None:
    """Read bandwidth from HBM (one sum over a 1 GiB tensor) and from L2 (one sum over a 16 MiB tensor expanded 32
    times with stride 0: do_bench's L2 flush leaves only the first pass to HBM): the rooflines the sparse kernels
    are held against. A reduction is not the fastest reader, so both are lower bounds."""
    big = torch.ones(1 << 29, device="cuda", dtype=torch.bfloat16)
    small = torch.ones(1 << 23, device="cuda", dtype=torch.bfloat16).view(1, -1).expand(32, -1)
    hbm = big.numel() * 2 / bench(big.sum) / 1e9
    l2 = small.numel() * 2 / bench(small.sum) / 1e9
    print(f"## read bandwidth: HBM {hbm:.2f} TB/s (1 GiB sum), L2 {l2:.2f} TB/s (16 MiB read 32 times)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sparsity", type=lambda s: [float(v) for v in s.split(",")], default=[0.0, 0.9, 0.98])
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--what", default="linear,conv")
    p.add_argument("--profile", action="store_true", help="torch.profiler tables of 5 steps")
    p.add_argument("--cprofile", action="store_true", help="cProfile of 30 steps (host time)")
    args = p.parse_args()
    args.what = [w.strip() for w in args.what.split(",") if w.strip()]
    if not args.what or set(args.what) - {"linear", "conv"}:
        p.error(f"--what: expected some of linear,conv, got {args.what}")
    torch.manual_seed(0)
    bandwidths()
    with lthfast.backend("triton"):
        if "linear" in args.what:
            linear(args)
        if "conv" in args.what:
            conv(args)


if __name__ == "__main__":
    main()
