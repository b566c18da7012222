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
