"""lthfast.threshold on groups large enough for the C++ sample bracket (>= 2^18 elements): each internal path
(bracket hit finished from the collected candidates, candidate overflow into tie mode, refinement, bracket
missed low and high) against the oracle, on 1, 2, 3 and 8 threads, with the AVX2 and the scalar kernels.

White-box on purpose: the pass counts and the "collected" flags reported by lthfast._C.select confirm that
each case reaches the path it is meant to test (if the C++ strategy changes, update the data so the paths
stay covered). tests/test_threshold_collect.py covers the collected path's edges.
"""

import contextlib

import pytest
import torch

from lthfast import _backend, reference, threshold

N = 1 << 19  # above the C++ sampling threshold (2^18)
SAMPLE = 1 << 15  # csrc/threshold.cpp kSampleSize


def sample_positions(n):
    """The positions csrc/threshold.cpp samples (mirrors sample_bracket)."""
    stride = n // SAMPLE
    s = torch.arange(SAMPLE, dtype=torch.int64)
    mult = (s + 1).to(torch.float64)  # the 64-bit product wraps; compute it exactly in Python ints
    h = torch.tensor([((int(v) * 0x9E3779B97F4A7C15) % (1 << 64)) >> 33 for v in mult.tolist()], dtype=torch.int64)
    return s * stride + h % stride


def split(flat, sizes):
    return [c.clone() for c in flat.split(sizes)]


def smooth():
    return torch.randn(N) * 0.05


def ties():
    return torch.randint(-4, 5, (N,)) * 0.125


def clustered():
    # 2^17 distinct keys packed into a few first-pass buckets (no sampling below 2^18: full-range first pass)
    return (1.0 + torch.randperm(1 << 17) * 2.0**-23) * torch.where(torch.rand(1 << 17) < 0.5, -1.0, 1.0)


def missed(low: bool):
    """The sampled elements are the large (low=False) or small (low=True) ones: the sample misleads."""
    flat = torch.rand(N) * 0.5
    sampled = sample_positions(N)
    flat[sampled] = (2.0 + torch.rand(SAMPLE)) * (0.01 if low else 1.0)
    return flat


# name: (data, spec, passes over the weights (a minimum when > 2), finished from the collected candidates)
CASES = {
    "smooth": (smooth, dict(amount=0.2), 1, True),  # count pass + a pass over masks and bits only
    "ties": (ties, dict(amount=0.37), 2, False),  # one key holds ~22% of the group: the candidates overflow
    "clustered": (clustered, dict(amount=0.6), 3, False),  # below 2^18: no sample, nothing collected
    "missed-high": (lambda: missed(low=False), dict(amount=0.5), 3, False),
    "missed-low": (lambda: missed(low=True), dict(amount=0.99), 3, False),
}


@contextlib.contextmanager
def vector_kernels(enabled: bool):
    """Runs the block with lthfast._C's AVX2 kernels on (where the CPU has them) or off (scalar kernels)."""
    previous = _backend.ext().set_vector_kernels(enabled)
    try:
        yield
    finally:
        _backend.ext().set_vector_kernels(previous)


def c_select(
    tensors, masks, amount, threads, write=True, k=None, grain=1 << 12, layerwise=False, scales=None,
    zero_weights=False, speculate=False,
):  # fmt: skip
    """lthfast._C.select on these tensors (one group, or one per tensor when layerwise): its raw result dict."""
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    groups = [[i] for i in range(len(tensors))] if layerwise else [list(range(len(tensors)))]

    def per_group(v):
        return list(v) if isinstance(v, (list, tuple)) else [v] * len(groups)

    return _backend.ext().select(
        [t.data_ptr() for t in tensors],
        [m.data_ptr() for m in masks] if masks is not None else [0] * len(tensors),
        [t.numel() for t in tensors],
        [codes[t.dtype] for t in tensors],
        scales or [],
        groups,
        [] if amount is None else per_group(amount),
        [] if k is None else per_group(k),
        write,
        threads,
        grain,
        zero_weights,
        speculate,
    )


@pytest.mark.parametrize(
    "vector,openmp", [(True, True), (False, True), (True, False)], ids=["avx2", "scalar", "avx2-std-threads"]
)
@pytest.mark.parametrize("case", list(CASES))
def test_cpp_paths_match_reference_on_any_thread_count(case, vector, openmp):
    if _backend.ext() is None:
        pytest.skip("lthfast._C is not built")
    previous = _backend.ext().block_use_openmp(openmp)  # csrc/parallel.h: torch's OpenMP team or std::threads
    try:
        _check_paths(case, vector)
    finally:
        _backend.ext().block_use_openmp(previous)


def _check_paths(case, vector):
    make, spec, passes, collected = CASES[case]
    flat = make()
    sizes = [flat.numel() // 3, flat.numel() // 3, flat.numel() - 2 * (flat.numel() // 3)]
    tensors = split(flat, sizes)
    masks = [torch.rand(t.shape) < 0.9 for t in tensors]
    expected, expected_t, expected_count = reference.threshold_prune(tensors, masks, **spec)
    with vector_kernels(vector):
        for threads in (1, 2, 3, 8):
            work = [m.clone() for m in masks]
            res = c_select(tensors, work, spec["amount"], threads)
            assert res["status"] == 0 and res["pruned"] == [expected_count] and res["threshold"] == expected_t
            assert all(torch.equal(a, b) for a, b in zip(work, expected)), f"{threads} threads"
            assert res["collected"] == [collected], "the case no longer reaches the path it is meant to test"
            if passes <= 2:
                assert res["passes"] == [passes], "the case no longer reaches the path it is meant to test"
            else:
                assert res["passes"][0] >= passes, "the case no longer reaches the path it is meant to test"
            res = c_select(tensors, [m.clone() for m in masks], spec["amount"], threads, write=False)
            assert res["threshold"] == expected_t and res["pruned"] == [0] and res["collected"] == [collected]


@pytest.mark.parametrize("impl", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
def test_large_groups_all_dtypes(impl, dtype, scaled):
    if impl == "cpp" and _backend.ext() is None:
        pytest.skip("lthfast._C is not built")
    shapes = [(256, 128, 3, 3), (1000, 37), (77,), (0, 5)]
    tensors = [(torch.randn(s) * (i + 1)).to(dtype) for i, s in enumerate(shapes)]
    masks = [torch.rand(s) < 0.75 for s in shapes]
    scales = [1.5, 0.25, 3.0, 1.0] if scaled else None
    expected, expected_t, count = reference.threshold_prune(tensors, masks, amount=0.3, scales=scales)
    t, got_count = threshold._select(tensors, masks, 0.3, None, scales, layerwise=False, write=True, impl=impl)
    assert all(torch.equal(a, b) for a, b in zip(masks, expected)) and t == expected_t and got_count == count


def test_large_layerwise_and_by_count():
    shapes = [(300, 1000), (512, 512)]
    tensors = [torch.randint(-50, 51, s) * 0.01 for s in shapes]  # ties within each tensor
    masks = [torch.rand(s) < 0.6 for s in shapes]
    ks = [int(m.sum()) // 3 for m in masks]
    expected, expected_t, count = reference.threshold_prune(tensors, masks, k=ks, layerwise=True)
    impls = ["torch"] + (["cpp"] if _backend.ext() is not None else [])
    for impl in impls:
        work = [m.clone() for m in masks]
        t, got = threshold._select(tensors, work, None, ks, None, layerwise=True, write=True, impl=impl, threads=2)
        assert all(torch.equal(a, b) for a, b in zip(work, expected)) and t == expected_t and got == count, impl
