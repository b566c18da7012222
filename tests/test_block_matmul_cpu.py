"""The CPU block-sparse route of the masked linear: the C++ kernels (lthfast._C, csrc/block_matmul.cpp) and the
torch block products, each against the float64 reference, and against each other across thread counts."""

import math

import pytest
import torch
from test_masked_linear import _check as check_against_reference

from lthfast import functional, reference
from lthfast.bench.masks import block_mask
from lthfast.ops import linear_torch

# Tolerances: test_masked_linear's TOL, (atol, rtol) per dtype. For fp32 compute each output sums at most K or M
# (<= 200 here) products of N(0, 1) values: the rounding error grows like sqrt(terms) * 2^-24 * |partial sums|,
# about 1e-5 at these sizes; atol 1e-4 leaves room for outputs that cancel to near zero (where rtol cannot help),
# and rtol 1e-5 is ~100 ulp. fp16 / bf16: products accumulate in fp32, then one rounding to 16 bits (one ulp:
# 2^-10, 2^-7). float64: the torch block path in float64.


@pytest.fixture(params=["cpp", "torch"])
def impl(request, monkeypatch):
    """The block route forced on any size and density (32x32 tiles), on the C++ kernels or the torch products."""
    monkeypatch.setattr(linear_torch, "CPU_MIN_MACS", 0)
    monkeypatch.setattr(linear_torch, "CPU_CROSSOVER", {32: 2.0})
    monkeypatch.setattr(linear_torch, "CPU_CROSSOVER_TORCH", {32: 2.0})
    if request.param == "torch":
        monkeypatch.setattr(linear_torch, "USE_EXT", False)
    elif linear_torch._block_ext(torch.float32) is None:
        pytest.skip("lthfast._C has no block kernels here (not built, or no AVX2 + FMA)")
    return request.param


@pytest.fixture
def calls(monkeypatch):
    """Counts the C++ kernel calls, to show which implementation ran."""
    ext = linear_torch._block_ext(torch.float32)
    counts = {"rows": 0, "grad_w": 0}
    if ext is None:
        return counts
    rows, grad_w = ext.block_rows_product, ext.block_grad_weight

    def counted(key, fn):
        def call(*args):
            counts[key] += 1
            return fn(*args)

        return call

    monkeypatch.setattr(ext, "block_rows_product", counted("rows", rows))
    monkeypatch.setattr(ext, "block_grad_weight", counted("grad_w", grad_w))
    return counts


def _mask(n, k, tile_sparsity, density=1.0):
    """Random 32x32 block mask with holes inside the alive tiles (density < 1)."""
    return block_mask(n, k, tile_sparsity, 32) & (torch.rand(n, k) < density)


def _step(x_shape, mask, dtype=torch.float32, bias=True, poison_w=False):
    """Forward + backward through the public function on the block route; test_masked_linear's check of y, dX,
    dW (exactly 0 off the mask), db against float64. Returns y, dX, dW."""
    assert linear_torch.plan(mask, math.prod(x_shape)) is not None, "meant to run the block route"
    y, x, w, _ = check_against_reference(x_shape, mask, dtype=dtype, bias=bias, poison=poison_w)
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize(
    "x_shape,n,k",
    [
        ((37,), 75, 70),  # nothing a multiple of 32 or of the kernel's 6 rows
        ((1,), 64, 96),  # M = 1
        ((5,), 33, 65),  # one-column / one-row edge tiles
        ((100,), 96, 128),  # whole tiles, M % 6 = 4, two row chunks of the C++ kernel
        ((2, 3), 40, 50),  # 3-D input
    ],
)
@pytest.mark.parametrize("tile_sparsity", [0.2, 0.5, 0.8])
def test_matches_reference(impl, calls, x_shape, n, k, tile_sparsity):
    _step(x_shape, _mask(n, k, tile_sparsity, density=0.7))
    assert (calls["rows"], calls["grad_w"]) == ((2, 1) if impl == "cpp" else (0, 0))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 12, 13])
def test_every_row_remainder(impl, m):
    _step((m,), _mask(64, 64, 0.25), bias=m % 2 == 0)


@pytest.mark.parametrize("m", [5, 70])
def test_64_tiles(impl, calls, monkeypatch, m):
    monkeypatch.setattr(linear_torch, "CPU_CROSSOVER", {64: 2.0})
    monkeypatch.setattr(linear_torch, "CPU_CROSSOVER_TORCH", {64: 2.0})
    mask = block_mask(150, 140, 0.5, 64) & (torch.rand(150, 140) < 0.8)
    assert linear_torch.plan(mask, m).block == 64
    _step((m,), mask)
    assert calls["rows"] == (2 if impl == "cpp" else 0)


def test_without_bias_and_unstructured_holes(impl):
    _step((23,), _mask(90, 100, 0.3, density=0.2), bias=False)


def test_all_pruned_mask(impl):
    mask = torch.zeros(40, 70, dtype=torch.bool)
    y, dx, dw = _step((9,), mask, poison_w=True)
    assert bool((dx == 0).all()) and bool((dw == 0).all())


def test_full_mask(impl):
    _step((11,), torch.ones(70, 40, dtype=torch.bool))


def test_nan_under_pruned_weights_does_not_leak(impl):
    """NaN in every pruned weight, dead tiles and holes inside alive tiles alike."""
    y, dx, dw = _step((17,), _mask(96, 80, 0.5, density=0.6), poison_w=True)
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(dx).all()) and bool(torch.isfinite(dw).all())


def test_nan_in_x_does_not_reach_pruned_dw(impl):
    """dW = (dY^T X) ⊙ M by selection: an Inf / NaN in X meets only pruned weights in its column."""
    n, k = 64, 96
    mask = _mask(n, k, 0.3, density=0.8)
    mask[:, 5] = False
    x = torch.randn(8, k)
    x[3, 5] = float("nan")
    x[6, 5] = float("inf")
    w, g = torch.randn(n, k, requires_grad=True), torch.randn(8, n)
    functional.masked_linear(x, w, mask).backward(g)
    ref = reference.masked_linear_backward(g.double(), x.double(), w.detach().double(), mask, False)[1]
    assert bool(torch.isfinite(ref).all())
    torch.testing.assert_close(w.grad.double(), ref, atol=1e-4, rtol=1e-5)
    assert bool((w.grad[~mask] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_fp32(impl, calls, dtype):
    _step((21,), _mask(70, 64, 0.4), dtype=dtype)
    assert calls["rows"] == (2 if impl == "cpp" else 0)


def test_float64_uses_the_torch_products(impl, calls):
    _step((9,), _mask(64, 70, 0.4, density=0.8), dtype=torch.float64)
    assert calls == {"rows": 0, "grad_w": 0}


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("openmp", [True, False])
def test_thread_count_does_not_change_the_result(impl, restore_threads, openmp):
    """Each output block is computed whole by one thread, in one order: results are bit-identical, whether the
    C++ kernels run on torch's OpenMP pool or on their own std::threads."""
    if impl == "torch" and not openmp:
        pytest.skip("the torch products have no such switch")
    ext = linear_torch._block_ext(torch.float32)
    previous = ext.block_use_openmp(openmp) if impl == "cpp" else None
    try:
        _same_for_any_thread_count(impl)
    finally:
        if previous is not None:
            ext.block_use_openmp(previous)


def _same_for_any_thread_count(impl):
    mask = _mask(200, 230, 0.6, density=0.9)
    x, w, b, g = torch.randn(130, 230), torch.randn(200, 230), torch.randn(200), torch.randn(130, 200)
    runs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        y = linear_torch.forward(x, w, mask, b)
        runs.append((y, *linear_torch.backward(g, x, w, mask, True, True)))
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            if impl == "cpp":
                assert torch.equal(a, c)
            else:  # MKL may split a product differently with more threads
                torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_cpp_and_torch_products_agree(monkeypatch):
    """The two implementations on one case, within fp32 rounding of each other."""
    monkeypatch.setattr(linear_torch, "CPU_MIN_MACS", 0)
    monkeypatch.setattr(linear_torch, "CPU_CROSSOVER", {32: 2.0})
    monkeypatch.setattr(linear_torch, "CPU_CROSSOVER_TORCH", {32: 2.0})
    if linear_torch._block_ext(torch.float32) is None:
        pytest.skip("lthfast._C has no block kernels here (not built, or no AVX2 + FMA)")
    mask = _mask(150, 140, 0.5, density=0.7)
    x, w, b, g = torch.randn(50, 140), torch.randn(150, 140), torch.randn(150), torch.randn(50, 150)
    runs = []
    for use_ext in (True, False):
        monkeypatch.setattr(linear_torch, "USE_EXT", use_ext)
        runs.append((linear_torch.forward(x, w, mask, b), *linear_torch.backward(g, x, w, mask, True, True)))
    for cpp, torch_ in zip(*runs):
        torch.testing.assert_close(cpp, torch_, atol=1e-4, rtol=1e-5)
