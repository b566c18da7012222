"""The floor of one layer call: its FLOPs at the device's peak rate or its bytes at the memory bandwidth,
whichever is slower. ``of_floor`` = floor / measured time says how close a provider gets (1.0 = at the floor).

Peaks are the vendor's dense tensor-core numbers for 16-bit inputs (float16/bfloat16); other dtypes and unknown
devices have no floor unless ``--peak-tflops`` and ``--peak-gbps`` are given.
"""

from __future__ import annotations

import torch

# device-name substring -> (dense fp16/bf16 TFLOP/s, memory TB/s); the first match wins, so specific names first.
PEAKS = (
    ("H100 PCIe", 756.0, 2.0),
    ("H100 NVL", 835.0, 3.9),
    ("H100", 989.0, 3.35),  # SXM
    ("H200", 989.0, 4.8),
    ("A100-SXM4-80GB", 312.0, 2.039),
    ("A100 80GB PCIe", 312.0, 1.935),
    ("A100", 312.0, 1.555),
)


def peak(device_name: str, dtype: torch.dtype, tflops: float | None = None, gbps: float | None = None):
    """(TFLOP/s, GB/s) for this device and dtype, or None. Explicit ``tflops`` and ``gbps`` win."""
    if tflops and gbps:
        return tflops, gbps
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    for name, rate, tbps in PEAKS:
        if name in device_name:
            return rate, tbps * 1e3
    return None


def layer_bytes(shapes: dict, density: float, itemsize: int, train: bool) -> float:
    """Compulsory traffic of one call: x, the alive weights and y (train: the three GEMMs each move as much)."""
    x = torch.Size(shapes["x"]).numel()
    y = torch.Size(shapes["y"]).numel()
    w = torch.Size(shapes["weight"]).numel() * density
    return (x + y + w) * itemsize * (3 if train else 1)


def floor_ms(flops: float, nbytes: float, rates: tuple[float, float]) -> float:
    tflops, gbps = rates
    return max(flops / (tflops * 1e12), nbytes / (gbps * 1e9)) * 1e3


# ------------------------------------------------------------------------------------------- per-kernel model
#
# The one GPU run (NVIDIA H200, bf16, Linear 4096x4096 at 8192 tokens; benchmarks/results/h200-notes.md) fits one law:
# the forward, dX and dW at 90% in 32x32 blocks and the 0% forward at 64x64 tiles all ran at ~6.4 TB/s of loads from
# L2 into the SMs, so a masked GEMM kernel's time is its loaded bytes / 6.4 TB/s while that is above its flops at the
# tensor cores' peak. Loaded bytes per flop of one main-loop step, in the operands' itemsize s:
#   forward (Y tile [BM, BN], loop over alive k-tiles): X slab BM x BK and W tile BN x BK, plus the mask tile
#     (BN x BK bytes) on a partial tile: (s (BM BK + BN BK) + mask) / (2 BM BN BK) = s / 2 (1/BN + 1/BM) (+ 1/(2 BM))
#   dX (dX tile [BM, BK], loop over alive n-tiles): the same with BN and BK swapped;
#   dW (GROUP alive tiles of one column, loop over M): dY BM x GROUP BN and X BM x BK: s / 2 (1/BK + 1/(GROUP BN)).
# The model is a lower bound where programs run few iterations: at 98% in 32x32 blocks (8192 programs of ~2.6
# iterations) the H200 took 4-5x longer than it (per-program latency, 1.5 TB/s of loads).
L2_FEED_TBPS = 6.4
GEMM_KERNELS = ("forward", "dX", "dW")


def gemm_bytes_per_flop(
    kernel: str, block_m: int, block_n: int, block_k: int, itemsize: int, partial: bool = False, group: int = 1
) -> float:
    """Bytes loaded into the SMs per flop by a masked GEMM kernel's main loop (see the model above); ``partial``:
    the tile is partial, so the forward and dX also load its mask."""
    if kernel == "dW":
        return itemsize / 2 * (1 / block_k + 1 / (group * block_n))
    wide, other = (block_n, block_k) if kernel == "forward" else (block_k, block_n)
    mask = block_n * block_k if partial else 0
    return (itemsize * (block_m * other + block_n * block_k) + mask) / (2 * block_m * wide * other)


def predict_gemm_ms(
    kernel: str,
    tokens: int,
    alive_tiles: int,
    partial_tiles: int,
    tile: tuple[int, int],
    block_m: int,
    itemsize: int,
    peak_tflops: float,
    l2_tbps: float = L2_FEED_TBPS,
    group: int = 1,
) -> float:
    """Predicted time of one masked GEMM kernel over ``alive_tiles`` weight tiles of ``tile`` = (BN, BK) at
    ``tokens`` rows: the larger of its loads at ``l2_tbps`` and its flops at ``peak_tflops``."""
    block_n, block_k = tile
    per_tile = 2.0 * tokens * block_n * block_k
    full = alive_tiles - partial_tiles
    nbytes = per_tile * (
        full * gemm_bytes_per_flop(kernel, block_m, block_n, block_k, itemsize, False, group)
        + partial_tiles * gemm_bytes_per_flop(kernel, block_m, block_n, block_k, itemsize, True, group)
    )
    return max(nbytes / (l2_tbps * 1e12), per_tile * alive_tiles / (peak_tflops * 1e12)) * 1e3
