"""threshold.prune_(..., zero_weights=True): the masks exactly as without it (the oracle's), and the weights it
prunes set to +0.0 in the same call; alive weights and weights dead before the call untouched (bits compared).
Runs every C++ path of test_threshold_paths.CASES (collected, tie quota, no sample, bracket missed on either
side), AVX2 and scalar kernels, fp32 and 16-bit weights, contiguous and strided weights, and the torch path.
"""

import pytest
import torch
from test_threshold_paths import CASES, split, vector_kernels

from lthfast import _backend, reference, threshold


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def setup(case, dtype, seed=0):
    data, spec, _, _ = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    flat = data().to(dtype)
    n = flat.numel()
    sizes = [n // 3 + 5, n // 2 - 3, n - n // 3 - n // 2 - 2]  # piece boundaries off the 8- and 32-element grid
    alive = torch.rand(n, generator=gen) < 0.85
    flat[~alive & (torch.rand(n, generator=gen) < 0.5)] = 0  # dead weights: half already zero, half not
    return split(flat, sizes), split(alive, sizes), spec


def check(tensors, masks, before, spec, **opts):
    expected, expected_t, expected_count = reference.threshold_prune(before[0], before[1], **spec)
    amount, k = spec.get("amount"), spec.get("k")
    t, count = threshold._select(
        tensors, masks, amount, k, None, layerwise=False, write=True, zero_weights=True, **opts
    )
    assert (t, count) == (expected_t, expected_count)
    for i, (w, m, w0, m0, want) in enumerate(zip(tensors, masks, before[0], before[1], expected)):
        assert torch.equal(m, want), f"tensor {i}: mask differs from the reference"
        pruned_now = m0 & ~want
        assert torch.equal(bits(w)[pruned_now], torch.zeros_like(bits(w)[pruned_now])), f"tensor {i}: not +0.0"
        kept = ~pruned_now
        assert torch.equal(bits(w)[kept], bits(w0)[kept]), f"tensor {i}: a weight it did not prune changed"
    assert sum(int((m0 & ~m).sum()) for m0, m in zip(before[1], masks)) == expected_count


needs_ext = pytest.mark.skipif(_backend.ext() is None, reason="lthfast._C is not built")


@needs_ext
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("vector", [True, False], ids=["avx2", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_zeroes_what_it_prunes(case, vector, dtype):
    tensors, masks, spec = setup(case, dtype)
    before = ([t.clone() for t in tensors], [m.clone() for m in masks])
    with vector_kernels(vector):
        check(tensors, masks, before, spec, impl="cpp", threads=2, grain=1 << 12)


@needs_ext
def test_cpp_strided_weights_are_written_back():
    tensors, masks, spec = setup("smooth", torch.float32, seed=1)
    wide = [torch.zeros(t.numel(), 2) for t in tensors]
    for w, t in zip(wide, tensors):
        w[:, 0] = t
    strided = [w[:, 0] for w in wide]  # non-contiguous views: the C++ path works on copies
    before = ([t.clone() for t in strided], [m.clone() for m in masks])
    check(strided, masks, before, spec, impl="cpp", threads=2)
    assert all(torch.equal(w[:, 1], torch.zeros_like(w[:, 1])) for w in wide)


@pytest.mark.parametrize("case", ["smooth", "ties"])
def test_torch_path_zeroes_what_it_prunes(case):
    tensors, masks, spec = setup(case, torch.float32, seed=2)
    before = ([t.clone() for t in tensors], [m.clone() for m in masks])
    check(tensors, masks, before, spec, impl="torch")


def test_zeroing_bumps_weight_versions():
    tensors, masks, spec = setup("smooth", torch.float32, seed=3)
    versions = [t._version for t in tensors]
    threshold.prune_(tensors, masks, zero_weights=True, **spec)
    assert all(t._version > v for t, v in zip(tensors, versions))
