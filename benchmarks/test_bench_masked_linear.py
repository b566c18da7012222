"""pytest-benchmark regression suite for the masked linear layer, one group per (mode, mask), one entry per
provider (those of benchmarks/bench_masked_linear.py). Not in the default test run; run with

    .venv/bin/python -m pytest benchmarks/test_bench_masked_linear.py --benchmark-enable --benchmark-only \
        --benchmark-group-by=group

Each provider's outputs are checked against the float64 reference before it is timed (a wrong provider fails, an
unavailable one is skipped with its reason). Inputs rotate over pre-drawn random buffers. On CUDA every timed call
ends in a synchronize (wall-clock per call); quote ``bench_masked_linear.py`` (do_bench) for GPU numbers.
"""

from __future__ import annotations

import bench_masked_linear as bml  # also registers its forced-path providers (lthfast-block32, ...)
import pytest
import torch

from lthfast.bench import layer

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# CPU: the target layer (Linear(2048, 2048), batch 512, fp32; ~0.2 s per dense training step on 2 cores).
SHAPE = {"shape": (4096, 4096), "tokens": 8192} if CUDA else {"shape": (2048, 2048), "tokens": 512}
DTYPE = "bfloat16" if CUDA else "float32"
MASKS = [(0.0, 1), (0.5, 32), (0.9, 1), (0.9, 32), (0.95, 32), (0.98, 32)]  # (sparsity, block)
PROVIDERS = list(bml.SWEEP_PROVIDERS) + ["lthfast-triton" if CUDA else "lthfast-block32"]

_tensors: dict[str, tuple] = {}


def _prepared(mode: str, provider: str, sparsity: float, block: int):
    cfg = layer.LayerConfig(op="linear", mode=mode, dtype=DTYPE, device=DEVICE, buffers=4, **SHAPE)
    if mode not in _tensors:
        _tensors[mode] = layer.make_tensors(cfg)
    weight, bias, rotation = _tensors[mode]
    problem, expected = layer.make_problem(cfg, sparsity, block, weight, bias, rotation)
    entry, prepared = layer.prepare_provider(provider, problem, rotation, expected)
    if entry["status"] == "skipped":
        pytest.skip(entry["reason"])
    if entry["status"] == "error":
        pytest.fail(f"{provider}: {entry['reason']}")
    return prepared, rotation


@pytest.mark.parametrize("sparsity,block", MASKS, ids=[f"s{s:g}-b{b}" for s, b in MASKS])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_masked_linear(benchmark, mode, provider, sparsity, block):
    prepared, rotation = _prepared(mode, provider, sparsity, block)
    benchmark.group = f"masked_linear {mode} sparsity={sparsity:g} block={block}"
    benchmark.extra_info.update(provider=provider, device=DEVICE, dtype=DTYPE, **SHAPE)

    def call():
        out = prepared.call(*next(rotation))
        if CUDA:
            torch.cuda.synchronize()
        return out

    for _ in range(2):  # warm-up: autotuning, allocator, tile index
        call()
    benchmark.pedantic(call, rounds=5 if not CUDA else 50, iterations=1)
