"""The C++ threshold's collected path: the first count pass keeps the bracket's alive elements as candidates
and a bitset of those below it, and finishes without a second read of the weights. Every case is checked
against lthfast.reference.threshold_prune, and the "collected" flag of lthfast._C.select confirms which path
ran: the collected path at the edges of the bracket (k-th key = its first or last candidate, ties there),
its fallbacks (bracket missed by one element on either side, candidate pool overflow), dtypes and scales,
sparse and uint8 masks, layer-wise groups, skewed parts, threads and grains, AVX2 and scalar kernels.

The edge cases mirror csrc/threshold.cpp's sample (positions and bracket ranks); if that changes, the path
assertions fail and the data must follow.
"""

import math

import pytest
import torch
from test_threshold_paths import SAMPLE, c_select, sample_positions, vector_kernels

from lthfast import _backend, reference, threshold

N = 1 << 19
SIZES = [N // 3 + 1, N // 3 - 2, N - 2 * (N // 3) + 1]  # piece boundaries off the 8-element grid
THREAD_GRAINS = [(1, 1 << 16), (2, 1 << 16), (3, 1 << 12), (8, 64)]

pytestmark = pytest.mark.skipif(_backend.ext() is None, reason="lthfast._C is not built")


def split(flat, sizes=SIZES):
    return [c.clone() for c in flat.split(sizes)]


def check(tensors, masks, expect_collected, *, kernels=(True, False), runs=THREAD_GRAINS, **spec):
    """Every (kernels, threads, grain) run: masks, threshold and count equal to the oracle's; path as expected."""
    expected, expected_t, expected_count = reference.threshold_prune(tensors, masks, **spec)
    layerwise = spec.pop("layerwise", False)
    amount, k, scales = spec.get("amount"), spec.get("k"), spec.get("scales")
    for vector in kernels:
        with vector_kernels(vector):
            for threads, grain in runs:
                where = f"{'avx2' if vector else 'scalar'}, {threads} threads, grain {grain}"
                work = [m.clone() for m in masks]
                res = c_select(tensors, work, amount, threads, k=k, grain=grain, layerwise=layerwise, scales=scales)
                assert res["status"] == 0, where
                assert res["collected"] == expect_collected, f"{where}: not the path this case is meant to test"
                for i, (got, want) in enumerate(zip(work, expected)):
                    assert torch.equal(got, want), f"{where}: mask {i} differs from the reference"
                assert res["threshold"] == expected_t and sum(res["pruned"]) == expected_count, where
                res = c_select(
                    tensors, masks, amount, threads, k=k, grain=grain, layerwise=layerwise, scales=scales, write=False
                )
                assert res["threshold"] == expected_t and res["collected"] == expect_collected, where


def bracket_edge(case: str, ties_at_lo: bool = False, seed: int = 0):
    """fp32 data whose sample brackets [lo, hi] exactly (amount 0.25), with the alive count below lo and inside
    the bracket chosen so that the k-th key is the bracket's first key ("low-hit"), the last key below it
    ("low-miss"), its last key ("high-hit") or the first key above it ("high-miss")."""
    gen = torch.Generator().manual_seed(seed)
    amount, m = 0.25, SAMPLE
    sampled = sample_positions(N)
    alive = torch.rand(N, generator=gen) < 0.9
    alive[sampled] = True
    k = round(amount * int(alive.sum()))
    delta = 4.0 * math.sqrt(m * amount * (1 - amount)) + 16.0  # csrc/threshold.cpp sample_bracket
    lo_i, hi_i = math.floor(amount * m - delta), math.ceil(amount * m + delta)
    sample_keys = (1.0 + torch.arange(m, dtype=torch.float64) / 1024).to(torch.float32)  # distinct, exact
    lo, hi = float(sample_keys[lo_i]), float(sample_keys[hi_i])
    values = torch.empty(N)
    values[sampled] = sample_keys[torch.randperm(m, generator=gen)]
    inside = 3000  # unsampled alive keys inside the bracket
    in_bracket = inside + hi_i - lo_i + 1
    below = {"low-hit": k - 1, "low-miss": k, "high-hit": k - in_bracket, "high-miss": k - in_bracket - 1}[case]
    not_sampled = torch.ones(N, dtype=torch.bool)
    not_sampled[sampled] = False
    others = torch.nonzero(alive & not_sampled).reshape(-1)
    others = others[torch.randperm(others.numel(), generator=gen)]
    n_below = below - lo_i
    u = torch.rand(others.numel(), generator=gen)
    values[others[:n_below]] = u[:n_below] * 0.99  # keys < 1 <= lo
    mid = others[n_below : n_below + inside]
    values[mid] = (lo + (hi - lo) * u[n_below : n_below + inside].double()).float()  # in [lo, hi] after rounding
    if ties_at_lo:
        values[mid[:200]] = lo  # ties with the bracket's first sampled key, before and after it
    values[others[n_below + inside :]] = 40.0 + u[n_below + inside :]
    dead = torch.nonzero(~alive).reshape(-1)
    values[dead] = torch.where(torch.rand(dead.numel(), generator=gen) < 0.5, 1e-6, math.nan)  # never ranked
    values = values * torch.where(torch.rand(N, generator=gen) < 0.5, -1.0, 1.0)
    return split(values), split(alive), k, (lo, hi)


@pytest.mark.parametrize(
    ("case", "ties", "collected"),
    [("low-hit", False, 1), ("low-hit", True, 1), ("low-miss", False, 0), ("low-miss", True, 0),
     ("high-hit", False, 1), ("high-miss", False, 0)],
)  # fmt: skip
def test_bracket_edges(case, ties, collected):
    tensors, masks, k, (lo, hi) = bracket_edge(case, ties)
    spec = dict(amount=0.25)
    _, (t,), count = reference.threshold_prune(tensors, masks, **spec)
    assert count == k
    # the data puts the k-th key where the case says, independently of the C++ code
    assert {"low-hit": t == lo, "low-miss": t < lo, "high-hit": t == hi, "high-miss": t > hi}[case]
    check(tensors, masks, [collected], **spec)


def test_pool_overflow_without_ties_falls_back():
    # 8% of the keys packed (distinct) at the 25% quantile: ~9% of the group in the bracket, above the n/32 cap
    gen = torch.Generator().manual_seed(1)
    flat = torch.rand(N, generator=gen)
    sampled = torch.zeros(N, dtype=torch.bool)
    sampled[sample_positions(N)] = True
    packed = (torch.rand(N, generator=gen) < 0.08) & ~sampled
    flat[packed] = 0.25 + torch.rand(int(packed.sum()), generator=gen) * 1e-4
    masks = [torch.ones(s, dtype=torch.bool) for s in SIZES]
    check(split(flat), masks, [0], amount=0.25)


def test_skewed_parts_share_the_pool():
    # Every bracket element sits in the first half of the group: with 2 parts, part 0 collects 1.9% of the
    # group, more than a per-part share of the n/32 pool, and must still finish from its candidates.
    gen = torch.Generator().manual_seed(2)
    flat = torch.cat([torch.rand(N // 2, generator=gen), 10.0 + torch.rand(N // 2, generator=gen)])
    masks = [torch.ones(s, dtype=torch.bool) for s in SIZES]
    check(split(flat), masks, [1], amount=0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
def test_dtypes_scales_and_uint8_masks(dtype, scaled):
    gen = torch.Generator().manual_seed(3)
    tensors = [(torch.randn(s, generator=gen) * (0.5 + i)).to(dtype) for i, s in enumerate(SIZES)]
    masks = [torch.randint(0, 3, (s,), generator=gen, dtype=torch.uint8) for s in SIZES]  # 1 and 2 are alive
    scales = [1.5, 0.3, 2.0] if scaled else None
    expected, expected_t, count = reference.threshold_prune(tensors, masks, amount=0.2, scales=scales)
    for threads, grain in THREAD_GRAINS[1:3]:
        work = [m.clone() for m in masks]
        t, got = threshold._select(
            tensors, work, 0.2, None, scales, layerwise=False, write=True, impl="cpp", threads=threads, grain=grain
        )
        assert all(torch.equal(a, b) for a, b in zip(work, expected)) and t == expected_t and got == count
    check(tensors, masks, [1], runs=THREAD_GRAINS[1:2], amount=0.2, scales=scales)


@pytest.mark.parametrize("density", [0.05, 0.3])
def test_already_sparse_masks(density):
    gen = torch.Generator().manual_seed(4)
    masks = [torch.rand(s, generator=gen) < density for s in SIZES]
    tensors = [torch.randn(s, generator=gen).masked_fill(~m, 1e-7) for s, m in zip(SIZES, masks)]
    check(tensors, masks, [1], amount=0.45)
    alive = sum(int(m.sum()) for m in masks)
    check(tensors, masks, [1], kernels=(True,), k=alive // 10)


def test_layerwise_groups_take_their_own_paths():
    gen = torch.Generator().manual_seed(5)
    smooth = torch.randn(N // 2, generator=gen)
    tied = torch.randint(-4, 5, (N // 2,), generator=gen) * 0.125  # the candidates overflow
    small = torch.randn(1000, generator=gen)  # below the sampling size: nothing collected
    tensors = [smooth, tied, small]
    masks = [torch.rand(t.shape, generator=gen) < 0.8 for t in tensors]
    check(tensors, masks, [1, 0, 0], layerwise=True, amount=[0.3, 0.37, 0.5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_weights_in_large_groups_leave_masks_untouched(dtype, bad):
    gen = torch.Generator().manual_seed(6)
    tensors = [t.to(dtype) for t in split(torch.randn(N, generator=gen))]
    masks = [torch.rand(t.shape, generator=gen) < 0.9 for t in tensors]
    tensors[0][SIZES[0] // 2] = bad  # dead: not ranked, not an error
    masks[0][SIZES[0] // 2] = False
    tensors[1][SIZES[1] // 2 + 3] = bad  # alive, inside the 8-wide loops
    masks[1][SIZES[1] // 2 + 3] = True
    before = [m.clone() for m in masks]
    only_tensor_1 = r"tensor 1 holds NaN or Inf among its alive weights \(tensors \[1\]\)"
    for vector in (True, False):
        with vector_kernels(vector):
            for threads in (1, 2):
                with pytest.raises(ValueError, match=only_tensor_1):
                    threshold._select(tensors, masks, 0.3, None, None, layerwise=False, write=True, impl="cpp",
                                      threads=threads)  # fmt: skip
                assert all(torch.equal(a, b) for a, b in zip(masks, before))


def test_k_above_alive_in_large_groups_leaves_masks_untouched():
    gen = torch.Generator().manual_seed(7)
    tensors = split(torch.randn(N, generator=gen))
    masks = [torch.rand(t.shape, generator=gen) < 0.9 for t in tensors]
    before = [m.clone() for m in masks]
    alive = sum(int(m.sum()) for m in masks)
    with pytest.raises(ValueError, match=f"k={alive + 1} exceeds the {alive} alive weights"):
        threshold._select(tensors, masks, None, alive + 1, None, layerwise=False, write=True, impl="cpp", threads=2)
    assert all(torch.equal(a, b) for a, b in zip(masks, before))
