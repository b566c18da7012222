"""Host time per masked training step that is not the kernels: what a GPU waits for when the step is host-bound.

On an H200 a masked Linear(4096, 4096) step at 98% sparsity took 1.28 ms with 0.43 ms of kernels
(benchmarks/results/h200-notes.md): the rest was host time. This script measures on any machine, CPU included,
the two parts of it that lthfast owns, each against what it replaced or what dense torch pays:

  tuner   one launch through Triton's ``Autotuner.run`` (what the kernels used to go through) against one
          ``lthfast.kernels.autotune.Tuned.launch``, both around the same no-op kernel with the masked linear
          forward's 24 arguments, the key already tuned. Neither includes Triton's own ``JITFunction.run``.
  layers  one training step (forward + backward) of ``functional.masked_linear`` / ``masked_conv2d`` on tiny
          tensors, where the step is nearly all host time: on the dense route (what "auto" runs on CUDA for
          unstructured masks) against the same step of ``F.linear`` / ``F.conv2d`` on W and on W * M (mask-multiply,
          what torch.nn.utils.prune does); and on the Triton route (validation, autograd, the tile-index lookups,
          the tuner, output allocation) with the Triton launches replaced by a no-op.

    python benchmarks/host_overhead.py [--what tuner,layers] [--repeat 5] [--calls 2000]

Each figure is the median over ``--repeat`` rounds of the mean over ``--calls`` calls, rounds interleaved
between the variants so that load on the machine hits all of them alike. One thread.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

import lthfast
from lthfast import _backend, functional


class NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    arg_names: list[str] = []
    fn = staticmethod(lambda: None)  # Autotuner unwraps .fn down to a function

    def __getitem__(self, grid):
        return self.run

    def run(self, *args, **kwargs):
        return None


def per_call_us(variants: dict, calls: int, repeat: int) -> dict[str, float]:
    """Median over ``repeat`` interleaved rounds of the mean time per call of each variant, in microseconds."""
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        for _ in range(max(10, calls // 10)):
            fn()
    for _ in range(repeat):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            rounds[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(times) for name, times in rounds.items()}


def tuner(calls: int, repeat: int) -> dict[str, float]:
    import triton
    from triton.runtime.autotuner import Autotuner

    from lthfast.kernels import masked_matmul as mm
    from lthfast.kernels.autotune import Tuned

    names = [
        "x_ptr",
        "w_ptr",
        "m_ptr",
        "b_ptr",
        "y_ptr",
        "row_ptr",
        "row_cols",
        "M",
        "N",
        "K",
        "tiles_n",
        "stride_xm",
        "stride_xk",
        "stride_wn",
        "stride_wk",
        "stride_mn",
        "stride_mk",
        "stride_ym",
        "stride_yn",
        "M_BUCKET",
        "ALIVE_BUCKET",
        "HAS_BIAS",
        "PRECISION",
        "UPCAST",
        "BLOCK_M",
        "BLOCK_N",
        "BLOCK_K",
    ]  # fmt: skip  (the forward's arguments as they were under triton.autotune, its key arguments included)
    kernel = NoLaunch()
    kernel.arg_names = names
    tensors = [torch.empty(4) for _ in range(7)]
    sizes = [8192, 4096, 4096, 128, 4096, 1, 4096, 1, 4096, 1, 4096, 1]
    constexprs = {"HAS_BIAS": True, "PRECISION": "ieee", "UPCAST": False, "BLOCK_N": 32, "BLOCK_K": 32}
    key = ["M_BUCKET", "N", "K", "ALIVE_BUCKET", "BLOCK_N", "BLOCK_K"]
    configs = [triton.Config({"BLOCK_M": c["BLOCK_M"]}, num_warps=c["num_warps"], num_stages=c["num_stages"])
               for c in mm.CUDA_CONFIGS]  # fmt: skip
    triton_tuner = Autotuner(kernel, names, configs, key, None, None, None)
    triton_args = (*tensors, *sizes, 8192, 2)
    triton_tuner.cache[(8192, 4096, 4096, 2, 32, 32, *["torch.float32"] * 7)] = configs[0]  # already tuned
    ours = Tuned(kernel, mm.CUDA_CONFIGS)
    our_key = (8192, 4096, 4096, 32, 32, 2, torch.float32, *constexprs.values())
    ours.best[our_key] = mm.CUDA_CONFIGS[0]  # already tuned
    grid = lambda meta: (64 * 128,)  # noqa: E731
    return per_call_us(
        {
            "triton Autotuner.run": lambda: triton_tuner.run(*triton_args, grid=grid, **constexprs),
            "lthfast Tuned.launch": lambda: ours.launch(our_key, grid, *tensors, *sizes, **constexprs),
        },
        calls,
        repeat,
    )


@contextlib.contextmanager
def kernels_stubbed():
    """The Triton route with every launch a no-op, on CPU tensors: everything but the kernels runs as on CUDA
    (``lthfast.bench.offline.cuda_decisions``: the CUDA tile shapes, tuner keys and dW splits)."""
    from lthfast.bench import offline
    from lthfast.kernels import autotune

    patches = [(t, "kernel", NoLaunch()) for t in offline.tuned_kernels()]
    patches += [
        (_backend, "triton_runs_on", lambda device: True),
        (autotune, "enabled", lambda: False),  # one config per key: the no-op kernels are never timed
    ]
    with offline.cuda_decisions(), offline.patched(patches), lthfast.backend("triton"):
        yield


def layers(calls: int, repeat: int) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(4, 64, requires_grad=True)
    w = torch.randn(64, 64, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    m = torch.rand(64, 64) > 0.9
    g = torch.randn(4, 64)
    xc = torch.randn(2, 16, 6, 6, requires_grad=True)
    wc = torch.randn(32, 16, 3, 3, requires_grad=True)
    mc = torch.rand(32, 16, 3, 3) > 0.9
    gc = torch.randn(2, 32, 6, 6)

    def linear_step():
        functional.masked_linear(x, w, m, b).backward(g)

    def conv_step():
        functional.masked_conv2d(xc, wc, mc, padding=1).backward(gc)

    mf, mcf = m.to(w.dtype), mc.to(wc.dtype)  # made once, as torch.nn.utils.prune keeps its mask
    torch_side = {
        "dense F.linear step (tiny)": lambda: F.linear(x, w, b).backward(g),
        "mask-multiply F.linear step (tiny)": lambda: F.linear(x, w * mf, b).backward(g),
        "lthfast masked_linear step, dense route": linear_step,
        "dense F.conv2d step (tiny)": lambda: F.conv2d(xc, wc, padding=1).backward(gc),
        "mask-multiply F.conv2d step (tiny)": lambda: F.conv2d(xc, wc * mcf, padding=1).backward(gc),
        "lthfast masked_conv2d step, dense route": conv_step,
    }
    with lthfast.backend("torch"):  # the route "auto" takes on CUDA for unstructured masks (most tiles alive)
        out = per_call_us(torch_side, calls, repeat)
    with kernels_stubbed():
        out.update(
            per_call_us(
                {
                    "lthfast masked_linear step, launches stubbed": linear_step,
                    "lthfast masked_conv2d step, launches stubbed": conv_step,
                },
                calls,
                repeat,
            )  # fmt: skip
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", default="tuner,layers")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    args.what = [w.strip() for w in args.what.split(",") if w.strip()]
    if not args.what or set(args.what) - {"tuner", "layers"}:
        p.error(f"--what: expected some of tuner,layers, got {args.what}")
    torch.set_num_threads(1)
    print(f"host time per call, us (median of {args.repeat} rounds x {args.calls} calls, 1 thread)")
    for what, fn in (("tuner", tuner), ("layers", layers)):
        if what in args.what:
            for name, us in fn(args.calls, args.repeat).items():
                print(f"  {name:48s} {us:8.1f}")


if __name__ == "__main__":
    main()
