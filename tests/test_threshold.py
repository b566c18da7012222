"""lthfast.threshold: every implementation against the sort-based oracle, bit for bit, and the semantics.

The ``impl`` fixture runs each test on the reference (lthfast.reference.threshold_prune), the C++ extension
(one thread, and three threads with a tiny grain so that even small tensors are split across parts and
tensor boundaries), and the pure-torch radix path on CPU tensors. ``check_semantics`` verifies the documented
rule independently of any implementation, so the oracle itself is tested too.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lthfast import _backend, reference, threshold

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IMPLS = ["reference", "cpp", "cpp-threads", "torch"]


class Impl:
    """One implementation behind the prune_/global_threshold API."""

    def __init__(self, name):
        self.name = name
        self.opts = {"cpp": dict(impl="cpp", threads=1), "cpp-threads": dict(impl="cpp", threads=3, grain=5)}.get(
            name, dict(impl="torch")
        )

    def prune_(self, tensors, masks, amount=None, k=None, scales=None, layerwise=False):
        if self.name == "reference":
            new, ts, count = reference.threshold_prune(tensors, masks, amount, k, scales, layerwise)
            for m, n in zip(masks, new):
                m.copy_(n)
            return (ts if layerwise else ts[0]), count
        ts, count = threshold._select(tensors, masks, amount, k, scales, layerwise=layerwise, write=True, **self.opts)
        return (ts if layerwise else ts[0]), count

    def global_threshold(self, tensors, masks=None, amount=None, k=None, scales=None):
        if self.name == "reference":
            _, ts, count = reference.threshold_prune(tensors, masks, amount, k, scales)
            return ts[0], count
        ts, count = threshold._select(tensors, masks, amount, k, scales, layerwise=False, write=False, **self.opts)
        return ts[0], count


@pytest.fixture(params=IMPLS)
def impl(request):
    if request.param.startswith("cpp") and _backend.ext() is None:
        pytest.skip("lthfast._C is not built")
    return Impl(request.param)


def random_tensors(shapes, dtype=torch.float32, density=0.7):
    tensors = [(torch.randn(s) * (i + 1) * 0.1).to(dtype) for i, s in enumerate(shapes)]
    masks = [torch.rand(s) < density for s in shapes]
    return tensors, masks


def check_semantics(tensors, old_masks, new_masks, threshold_value, count, k, scales=None):
    """The documented rule for one group: exactly k alive weights pruned, all below the threshold, ties in order."""
    keys = torch.cat(
        [reference.magnitude_keys(t, None if scales is None else scales[i]) for i, t in enumerate(tensors)]
    )
    old = torch.cat([m.reshape(-1) != 0 for m in old_masks]) if tensors else torch.zeros(0, dtype=torch.bool)
    new = torch.cat([m.reshape(-1) != 0 for m in new_masks]) if tensors else torch.zeros(0, dtype=torch.bool)
    pruned = old & ~new
    assert not (new & ~old).any(), "a mask grew"
    assert count == k and int(pruned.sum()) == k
    for m0, m1 in zip(old_masks, new_masks):  # uint8 values of kept weights are preserved
        assert torch.equal(m1[m1 != 0], m0[m1 != 0])
    if k == 0:
        assert threshold_value == -math.inf
        return
    kept = old & new
    assert float(keys[pruned].max()) == threshold_value
    if kept.any():
        assert float(keys[kept].min()) >= threshold_value
    ties = (keys == threshold_value) & old
    tie_pruned = pruned[ties]
    # pruned ties come first in (tensor, flat index) order: the pattern is 1...1 0...0
    assert torch.equal(tie_pruned, torch.sort(tie_pruned.to(torch.uint8), descending=True, stable=True).values.bool())


def assert_same_as_reference(impl, tensors, masks, **kw):
    expected_masks, expected_t, expected_count = reference.threshold_prune(tensors, masks, **kw)
    work = [m.clone() for m in masks]
    t, count = impl.prune_(tensors, work, **kw)
    for i, (got, want) in enumerate(zip(work, expected_masks)):
        assert torch.equal(got, want), f"mask {i} differs from the reference"
    assert count == expected_count
    assert t == (expected_t if kw.get("layerwise") else expected_t[0])
    return work, t, count


SHAPES = [(17, 5), (3, 3, 3, 3), (0,), (1,), (129,), (4, 0, 2), (64, 33)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("amount", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_matches_reference_random(impl, dtype, amount):
    tensors, masks = random_tensors(SHAPES, dtype)
    work, t, count = assert_same_as_reference(impl, tensors, masks, amount=amount)
    alive = sum(int(m.sum()) for m in masks)
    check_semantics(tensors, masks, work, t, count, round(amount * alive))


@pytest.mark.parametrize("dtype", DTYPES)
def test_heavy_ties_and_zeros(impl, dtype):
    tensors = [(torch.randint(-3, 4, s) * 0.5).to(dtype) for s in SHAPES]  # 4 magnitudes, zeros included
    tensors[0].view(-1)[::3] = -0.0  # -0.0 ties with +0.0
    masks = [torch.rand(s) < 0.8 for s in SHAPES]
    alive = sum(int(m.sum()) for m in masks)
    for k in sorted({0, 1, alive // 7, alive // 3, alive // 2, alive - 1, alive}):
        work, t, count = assert_same_as_reference(impl, tensors, masks, k=k)
        check_semantics(tensors, masks, work, t, count, k)


def test_all_equal_weights_prune_in_index_order(impl):
    tensors = [torch.full(s, -0.25) for s in SHAPES]
    masks = [torch.ones(s, dtype=torch.bool) for s in SHAPES]
    total = sum(t.numel() for t in tensors)
    k = total // 2 + 3
    work, t, count = assert_same_as_reference(impl, tensors, masks, k=k)
    assert t == 0.25 and count == k
    flat = torch.cat([m.reshape(-1) for m in work])
    assert not flat[:k].any() and flat[k:].all()


def test_k_zero_and_k_all(impl):
    tensors, masks = random_tensors(SHAPES)
    alive = sum(int(m.sum()) for m in masks)
    work = [m.clone() for m in masks]
    t, count = impl.prune_(tensors, work, k=0)
    assert t == -math.inf and count == 0
    assert all(torch.equal(a, b) for a, b in zip(work, masks))
    t, count = impl.prune_(tensors, work, k=alive)
    assert count == alive and not any(m.any() for m in work)
    assert t == max(float(w.abs()[m].max()) for w, m in zip(tensors, masks) if m.any())


def test_empty_inputs(impl):
    assert impl.global_threshold([], amount=0.5) == (-math.inf, 0)
    empties = [torch.zeros(0), torch.zeros(2, 0)]
    masks = [torch.zeros(0, dtype=torch.bool), torch.zeros(2, 0, dtype=torch.bool)]
    assert impl.prune_(empties, masks, amount=1.0) == (-math.inf, 0)
    assert impl.prune_(empties, masks, k=0, layerwise=True) == ([-math.inf, -math.inf], 0)


@pytest.mark.parametrize("density", [0.05, 0.5])
def test_already_sparse_masks_only_shrink(impl, density):
    tensors, masks = random_tensors(SHAPES, density=density)
    tensors = [t.masked_fill(~m, 1e-6) for t, m in zip(tensors, masks)]  # dead weights would rank first
    alive = sum(int(m.sum()) for m in masks)
    work, t, count = assert_same_as_reference(impl, tensors, masks, amount=0.3)
    check_semantics(tensors, masks, work, t, count, round(0.3 * alive))


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_two_rounds_leave_one_minus_p_squared(impl, p):
    tensors, _ = random_tensors(SHAPES)
    masks = [torch.ones(t.shape, dtype=torch.bool) for t in tensors]
    n = sum(t.numel() for t in tensors)
    impl.prune_(tensors, masks, amount=p)
    impl.prune_(tensors, masks, amount=p)
    alive = sum(int(m.sum()) for m in masks)
    first = n - round(p * n)
    assert alive == first - round(p * first)
    assert abs(alive / n - (1 - p) ** 2) <= 1.0 / n + 1e-12


@pytest.mark.parametrize(("amount", "alive"), [(0.5, 5), (0.5, 7), (0.25, 10), (0.1, 25), (0.3, 15)])
def test_rounding_is_half_to_even_like_torch(impl, amount, alive):
    from torch.nn.utils.prune import _compute_nparams_toprune

    tensors = [torch.randn(alive)]
    t, count = impl.global_threshold(tensors, amount=amount)
    assert count == round(amount * alive) == _compute_nparams_toprune(amount, alive)


def tie_free(shapes, dtype=torch.float32):
    """Distinct magnitudes (a permutation of a grid), random signs."""
    total = sum(math.prod(s) for s in shapes)
    values = (torch.randperm(total) + 1).to(torch.float64) / total
    values = (values * torch.where(torch.rand(total) < 0.5, -1.0, 1.0)).to(dtype)
    return [chunk.reshape(s) for chunk, s in zip(values.split([math.prod(s) for s in shapes]), shapes)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_torch_global_unstructured(impl, dtype):
    import torch.nn.utils.prune as tprune

    shapes = [(8, 4, 3, 3), (16, 8), (5,), (7, 3)]
    weights = tie_free(shapes, dtype)
    modules = [torch.nn.Module() for _ in shapes]
    for mod, w in zip(modules, weights):
        mod.weight = torch.nn.Parameter(w.clone())
    params = [(mod, "weight") for mod in modules]
    masks = [torch.ones(s, dtype=torch.bool) for s in shapes]
    for amount in (0.3, 0.45):  # the second round prunes among the survivors of the first
        tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=amount)
        impl.prune_(weights, masks, amount=amount)
        for i, mod in enumerate(modules):
            assert torch.equal(masks[i], mod.weight_mask.bool()), f"round {amount}: tensor {i} differs from torch"


def test_layerwise_matches_torch_l1_unstructured(impl):
    import torch.nn.utils.prune as tprune

    shapes = [(6, 5), (40,), (3, 3, 3)]
    weights = tie_free(shapes)
    masks = [torch.ones(s, dtype=torch.bool) for s in shapes]
    amounts = [0.25, 0.5, 0.75]
    thresholds, count = impl.prune_(weights, masks, amount=amounts, layerwise=True)
    for w, m, a, t in zip(weights, masks, amounts, thresholds):
        expected = tprune.L1Unstructured(a).compute_mask(w, torch.ones_like(w)).bool()
        assert torch.equal(m, expected)
        assert t == float(w.abs()[~m].max())
    assert count == sum(round(a * math.prod(s)) for a, s in zip(amounts, shapes))


@pytest.mark.parametrize("spec", [dict(amount=0.4), dict(k=3), dict(amount=[0.1, 0.0, 1.0, 0.5, 0.3, 0.9, 0.6])])
def test_layerwise_matches_reference(impl, spec):
    tensors, masks = random_tensors(SHAPES, torch.bfloat16)
    if "k" in spec:
        masks = [torch.ones(s, dtype=torch.bool) for s in SHAPES]
        spec = dict(k=[min(3, math.prod(s)) for s in SHAPES])
    assert_same_as_reference(impl, tensors, masks, layerwise=True, **spec)


def test_scales(impl):
    tensors, masks = random_tensors(SHAPES)
    scales = [2.0, 0.0, 1.0, 1e38, 0.3, 1.5, 1e-3]  # 0: ranked first; 1e38: some keys overflow to +inf
    work, t, count = assert_same_as_reference(impl, tensors, masks, amount=0.6, scales=scales)
    check_semantics(tensors, masks, work, t, count, round(0.6 * sum(int(m.sum()) for m in masks)), scales)
    # an exact power-of-two scale ranks a tensor exactly as if its weights were scaled
    doubled = [t * 2 if i == 0 else t for i, t in enumerate(tensors)]
    expected = [m.clone() for m in masks]
    impl.prune_(doubled, expected, amount=0.6)
    got = [m.clone() for m in masks]
    impl.prune_(tensors, got, amount=0.6, scales=[2.0] + [1.0] * (len(SHAPES) - 1))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_non_contiguous_tensors_and_masks(impl):
    base = [torch.randn(9, 13), torch.randn(6, 4, 5)]
    tensors = [base[0].t(), base[1].permute(2, 0, 1)[:, ::2]]
    masks = [torch.rand(t.shape[::-1]) < 0.8 for t in tensors]
    masks = [m.permute(*reversed(range(m.dim()))) for m in masks]  # non-contiguous, same logical shape
    assert not any(t.is_contiguous() for t in tensors) and not any(m.is_contiguous() for m in masks)
    contiguous = [t.contiguous() for t in tensors]
    expected, expected_t, _ = reference.threshold_prune(contiguous, [m.contiguous() for m in masks], amount=0.45)
    t, _ = impl.prune_(tensors, masks, amount=0.45)
    assert all(torch.equal(a, b) for a, b in zip(masks, expected)) and t == expected_t[0]


def test_uint8_masks_keep_their_values(impl):
    tensors = [torch.randn(40), torch.randn(5, 7)]
    masks = [torch.randint(0, 3, t.shape, dtype=torch.uint8) for t in tensors]  # 1 and 2 are alive
    work, t, count = assert_same_as_reference(impl, tensors, masks, amount=0.5)
    check_semantics(tensors, masks, work, t, count, round(0.5 * sum(int((m != 0).sum()) for m in masks)))


def test_global_threshold_changes_nothing_and_agrees_with_prune(impl):
    tensors, masks = random_tensors(SHAPES, torch.float16)
    before = [m.clone() for m in masks]
    t, count = impl.global_threshold(tensors, masks, amount=0.35)
    assert all(torch.equal(a, b) for a, b in zip(masks, before))
    assert impl.prune_(tensors, masks, amount=0.35) == (t, count)
    t_all, _ = impl.global_threshold(tensors, None, k=10)
    assert t_all == torch.sort(torch.cat([x.abs().float().reshape(-1) for x in tensors])).values[9].item()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
    dtype=st.sampled_from(DTYPES),
    levels=st.sampled_from([0, 3, 50]),  # 0: continuous values; else quantized to this many levels (ties)
    density=st.floats(0.0, 1.0),
    fraction=st.floats(0.0, 1.0),
    by_count=st.booleans(),
    layerwise=st.booleans(),
    scaled=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_agrees_with_reference(
    impl, sizes, dtype, levels, density, fraction, by_count, layerwise, scaled, seed
):
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=gen) for n in sizes]
    if levels:
        tensors = [torch.round(t * levels / 4) for t in tensors]
    tensors = [t.to(dtype) for t in tensors]
    masks = [torch.rand(n, generator=gen) < density for n in sizes]
    alive = [int(m.sum()) for m in masks]
    if by_count:
        spec = dict(k=[int(fraction * a) for a in alive] if layerwise else int(fraction * sum(alive)))
    else:
        spec = dict(amount=fraction)
    scales = [float(s) for s in torch.rand(len(sizes), generator=gen) * 3] if scaled else None
    assert_same_as_reference(impl, tensors, masks, scales=scales, layerwise=layerwise, **spec)


def test_prune_moves_mask_versions_so_layer_caches_follow(impl):
    """prune_ on a live MaskedLinear mask must invalidate its tile index and block plan: the C++ path writes
    through raw pointers, so it bumps the version counters itself (a stale plan kept the old mask values)."""
    from lthfast.nn import MaskedLinear

    if impl.name == "reference":
        pytest.skip("the oracle writes through copy_")
    torch.manual_seed(0)
    layer = MaskedLinear.from_dense(torch.nn.Linear(1024, 1024, bias=False))
    with torch.no_grad():
        tiles = torch.rand(32, 32) < 0.1  # block-sparse: the CPU block path and its cached plan are used
        layer.mask.copy_(tiles.repeat_interleave(32, 0).repeat_interleave(32, 1))
    x = torch.randn(512, 1024)
    layer(x)  # builds and caches the tile index and plan of the current mask
    version = layer.mask._version
    impl.prune_([layer.weight.detach()], [layer.mask], amount=0.5)
    assert layer.mask._version > version
    expected = torch.nn.functional.linear(x.double(), (layer.weight * layer.mask).double())
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-4, rtol=1e-5)
