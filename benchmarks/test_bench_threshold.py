"""pytest-benchmark version of bench_threshold.py: the same providers on the same ~30M weights.

Run with ``make bench`` (or ``pytest benchmarks/test_bench_threshold.py --benchmark-enable``). Each provider's
mask is checked against the reference before it is timed; masks are reset in the (untimed) setup.
"""

import pytest
import torch
from bench_threshold import PROVIDERS, SHAPES, fresh_masks, make_weights, provider, unique_k

from lthfast import reference


@pytest.fixture(scope="module")
def problem():
    weights = make_weights(SHAPES, torch.device("cpu"))
    k = unique_k(weights, 0.2)
    expected, _, _ = reference.threshold_prune(weights, k=k)
    return weights, k, expected


@pytest.mark.benchmark(group="threshold-30M-cpu")
@pytest.mark.parametrize("name", PROVIDERS)
def test_threshold(benchmark, problem, name):
    weights, k, expected = problem
    run = provider(name, weights, k)
    if run is None:
        pytest.skip(f"{name} is not available here")
    got = run(fresh_masks(weights))
    if name != "floor_sum":
        assert all(torch.equal(g.bool(), e) for g, e in zip(got, expected)), f"{name} masks differ from the reference"
    masks = fresh_masks(weights)

    def reset():
        for m in masks:
            m.fill_(True)
        return (masks,), {}

    rounds = 3 if name == "global_unstructured" else 15
    benchmark.pedantic(run, setup=reset, rounds=rounds, iterations=1, warmup_rounds=1)
