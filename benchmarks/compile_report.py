"""What Triton builds from the masked kernels for an H100 (sm_90), on a machine without a GPU.

Runs the launchers of one training step (forward, dX and dW, whose M-splits finish inside its launch) for the issues'
headline layers through ``lthfast.bench.offline.cuda_target``: every candidate config of every kernel is compiled
for sm_90 with Triton's own specialization, and its tensor-core instruction, pipelining, shared memory, registers,
spills and occupancy are printed (``--json`` writes them). No kernel runs; no GPU is needed.

    python benchmarks/compile_report.py [--what linear,conv] [--dtype bfloat16] [--first] [--json out.json]

Layers: Linear(4096, 4096) at 8192 tokens (issue 3), a 3x3 conv 256 -> 256 on 128 x 16 x 16 (ResNet-18 CIFAR's
third stage, issue 4) and, with ``--what conv-s2``, that stage's stride-2 entry (128 -> 256 on 128 x 32 x 32), each
at 0% and at 90% / 98% sparsity in 32-wide blocks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from lthfast.bench import offline
from lthfast.bench.masks import block_mask, conv_block_mask

SPARSITIES = (0.0, 0.9, 0.98)
BLOCK = 32


def linear_step(
    dtype: torch.dtype, sparsity: float, tokens: int = 8192, features: int = 4096, group: int | None = None
) -> None:
    """The three launches of one masked Linear training step; ``group``: the dW's tiles per program (default:
    every tuned config)."""
    from lthfast.kernels import masked_matmul as mm

    gen = torch.Generator().manual_seed(0)
    x = torch.empty(tokens, features, dtype=dtype)
    w = torch.empty(features, features, dtype=dtype)
    b = torch.empty(features, dtype=dtype)
    mask = block_mask(features, features, sparsity, BLOCK, gen)
    index = mm.mask_tile_index(mask)
    y = mm.masked_linear_forward(x, w, mask, b, index)
    mm.masked_linear_grad_input(y, w, mask, index)
    mm.masked_linear_grad_weight(y, x, mask, index, group=group)


def conv_step(
    dtype: torch.dtype, sparsity: float, batch: int = 128, cin: int = 256, cout: int = 256, size: int = 16, stride=1
) -> None:
    """The launches of one masked 3x3 conv training step (padding 1), channels_last activations."""
    from lthfast.kernels import masked_conv as mc

    gen = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = torch.empty(batch, cin, size, size, dtype=dtype).contiguous(memory_format=cl)
    w = torch.empty(cout, cin, 3, 3, dtype=dtype)
    b = torch.empty(cout, dtype=dtype)
    mask = conv_block_mask(tuple(w.shape), sparsity, BLOCK, gen)
    out = torch.empty(batch, cout, size // stride, size // stride, dtype=dtype).contiguous(memory_format=cl)
    conv = ((stride, stride), (1, 1, 1, 1), (1, 1))
    mc.conv2d_forward(x, w, mask, b, out, *conv)
    mc.conv2d_grad_input(out, w, mask, torch.empty_like(x), *conv)
    mc.conv2d_grad_weight(out, x, mask, torch.empty_like(w), *conv)


def conv_stride2_step(dtype: torch.dtype, sparsity: float) -> None:
    """A downsampling 3x3 conv, 128 -> 256 channels, stride 2, on 128 x 32 x 32 (ResNet-18 CIFAR's layer3 entry)."""
    conv_step(dtype, sparsity, cin=128, cout=256, size=32, stride=2)


STEPS = {"linear": linear_step, "conv": conv_step, "conv-s2": conv_stride2_step}
COLUMNS = ("kernel", "BLOCK_M", "GROUP", "num_warps", "num_stages", "shared", "registers", "local", "wgmma", "mma",
           "cp_async", "programs_per_sm", "loop_instructions", "loop_mma", "full_loop_instructions")  # fmt: skip


def table(rows: list[dict]) -> str:
    head = ("layer", "sparsity", *COLUMNS)
    lines = [head] + [tuple(str(r.get(c, "")) for c in head) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", default="linear,conv", help="comma list of: " + ", ".join(STEPS))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--first", action="store_true", help="compile only each launch's first config")
    parser.add_argument("--classic", action="store_true",
                        help="only the one-program-per-tile kernels, not their persistent twins")  # fmt: skip
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if not offline.available():
        print("compile_report: this triton has no NVIDIA backend tools (ptxas, cuobjdump)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    rows = []
    start = time.perf_counter()
    for what in args.what.split(","):
        for sparsity in SPARSITIES:
            with offline.cuda_target(all_configs=not args.first, variants=not args.classic) as compiled:
                STEPS[what](dtype, sparsity)
            rows += [{"layer": what, "sparsity": sparsity, "dtype": args.dtype, **c.row()} for c in compiled]
    print(table(rows))
    print(f"# {len(rows)} variants compiled for sm_90 in {time.perf_counter() - start:.0f} s")
    if args.json:
        import triton

        from lthfast.bench.results import git_info

        doc = {"target": "sm_90", "triton": triton.__version__, "git": git_info(),
               "command": "python benchmarks/compile_report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "rows": rows}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
