"""Regression benchmarks for the masked layers (pytest-benchmark), grouped by op, mode and mask; one entry per
provider. Not part of the default test run (pytest's testpaths is tests/); run with ``make bench`` or

    .venv/bin/python -m pytest benchmarks --benchmark-enable --benchmark-only --benchmark-group-by=group

Each provider's output is checked against the float64 reference before it is timed (a wrong provider fails, an
unavailable one is skipped with torch's reason). Inputs rotate over pre-drawn random buffers. On CUDA every
timed call ends in a synchronize, so the numbers are wall-clock per call; ``lthfast bench layer`` (do_bench,
CUDA events) is the sweep to quote.
"""

from __future__ import annotations

import pytest
import torch

from lthfast._backend import interpreter_enabled
from lthfast.bench import layer, providers

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Small on CPU (a few ms per call on 2 cores), the shapes on a GPU.
LINEAR = {"shape": (4096, 4096), "tokens": 8192} if CUDA else {"shape": (512, 512), "tokens": 128}
CONV = {"shape": (256, 256, 3, 3), "batch": 64, "image": (32, 32)} if CUDA else {"shape": (32, 32, 3, 3), "batch": 8}
DTYPE = "bfloat16" if CUDA else "float32"
MASKS = [(0.0, 1), (0.9, 1), (0.9, 32), (0.98, 32)]  # (sparsity, block)
if not CUDA and interpreter_enabled():
    pytest.skip(
        "TRITON_INTERPRET=1 on CPU: lthfast would time Triton's interpreter (and interpreter-sized tiles); unset it",
        allow_module_level=True,
    )

_tensors: dict[tuple, tuple] = {}


def _config(op: str, mode: str) -> layer.LayerConfig:
    shape = LINEAR if op == "linear" else CONV
    return layer.LayerConfig(op=op, mode=mode, dtype=DTYPE, device=DEVICE, buffers=8, **shape)


def _prepared(op: str, mode: str, provider: str, sparsity: float, block: int):
    cfg = _config(op, mode)
    if (op, mode) not in _tensors:  # one weight and one rotation per (op, mode), shared by its benchmarks
        _tensors[(op, mode)] = layer.make_tensors(cfg)
    weight, bias, rotation = _tensors[(op, mode)]
    problem, expected = layer.make_problem(cfg, sparsity, block, weight, bias, rotation)
    entry, prepared = layer.prepare_provider(provider, problem, rotation, expected)
    if entry["status"] == "skipped":
        pytest.skip(entry["reason"])
    if entry["status"] == "error":
        pytest.fail(f"{provider}: {entry['reason']}")
    return prepared, rotation


@pytest.mark.parametrize("sparsity,block", MASKS, ids=[f"s{s:g}-b{b}" for s, b in MASKS])
@pytest.mark.parametrize("provider", providers.PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("op", ["linear", "conv"])
def test_layer(benchmark, op, mode, provider, sparsity, block):
    prepared, rotation = _prepared(op, mode, provider, sparsity, block)
    benchmark.group = f"{op} {mode} sparsity={sparsity:g} block={block}"
    benchmark.extra_info.update(provider=provider, device=DEVICE, dtype=DTYPE, detail=prepared.detail)

    def call():
        out = prepared.call(*next(rotation))
        if CUDA:
            torch.cuda.synchronize()
        return out

    for _ in range(3):  # warm-up: compilation, autotuning, allocator
        call()
    benchmark(call)
