"""Speculative pruning in the C++ threshold's first count pass (zero_weights with bool masks, no aliasing): the
alive fp32 weights below the sample bracket are pruned in place while the pass has their lines in cache, and
logged; the log puts them back, bit for bit, when the call fails (NaN/Inf, k too large) or the bracket misses,
and the final pass skips the ranges the count pass already pruned. It runs only when the sample expects at
most 1/16 of the group below its bracket (later IMP rounds; the cases here prune ~5%).

White-box: the "speculated" counts of lthfast._C.select confirm the speculation ran (and how far), so that an
undo path cannot pass by not speculating. Every outcome is checked against lthfast.reference.threshold_prune
with the weights compared as bits (-0.0, subnormals and NaN payloads of dead weights included).
"""

import math

import pytest
import torch
from test_threshold_paths import SAMPLE, c_select, sample_positions, split, vector_kernels

from lthfast import _backend, reference, threshold

pytestmark = pytest.mark.skipif(_backend.ext() is None, reason="lthfast._C is not built")

N = 1 << 19
SIZES = [N // 3 + 5, N // 2 - 3, N - N // 3 - N // 2 - 2]  # piece boundaries off the 8- and 16-element grid


def bits(t):
    return t.view(torch.int32)


def with_dead(flat, seed, density=0.85):
    """Split into SIZES with a random mask; dead weights: -0.0, subnormals, NaN or ordinary values (never read
    as alive, so never ranked or zeroed)."""
    gen = torch.Generator().manual_seed(seed)
    flat = flat.clone()
    alive = torch.rand(flat.numel(), generator=gen) < density
    dead = torch.nonzero(~alive).reshape(-1)
    pick = torch.randint(0, 4, (dead.numel(),), generator=gen)
    flat[dead] = torch.where(pick == 0, -0.0, torch.where(pick == 1, 1e-40, torch.where(pick == 2, math.nan, 0.3)))
    # alive -0.0 and subnormals too: pruned first, so the log must give back their exact bits
    small = torch.nonzero(alive).reshape(-1)[:64]
    flat[small[:32]] = -0.0
    flat[small[32:]] = -1e-41
    return split(flat, SIZES), split(alive, SIZES)


def run(tensors, masks, spec, threads, speculate=True):
    return c_select(tensors, masks, spec.get("amount"), threads, k=spec.get("k"), zero_weights=True,
                    speculate=speculate, layerwise=spec.get("layerwise", False))  # fmt: skip


def check_pruned(tensors, masks, before, res, spec):
    expected, expected_t, count = reference.threshold_prune(before[0], before[1], **spec)
    assert res["status"] == 0 and sum(res["k"]) == count
    assert res["threshold"] == (expected_t if isinstance(expected_t, list) else [expected_t])
    for i, (w, m, w0, m0, want) in enumerate(zip(tensors, masks, before[0], before[1], expected)):
        assert torch.equal(m, want), f"tensor {i}: mask differs from the reference"
        now = m0 & ~want
        assert not bits(w)[now].any(), f"tensor {i}: a weight it pruned is not +0.0"
        assert torch.equal(bits(w)[~now], bits(w0)[~now]), f"tensor {i}: a weight it did not prune changed"


def unchanged(tensors, masks, before):
    return all(torch.equal(bits(w), bits(w0)) for w, w0 in zip(tensors, before[0])) and all(
        torch.equal(m, m0) for m, m0 in zip(masks, before[1])
    )


def misleading(sampled_large: bool):
    """The sampled positions hold the large (or small) values: the sample's bracket misses on that side."""
    gen = torch.Generator().manual_seed(21)
    flat = torch.rand(N, generator=gen) * 0.5
    flat[sample_positions(N)] = (2.0 + torch.rand(SAMPLE, generator=gen)) * (1.0 if sampled_large else 0.01)
    return flat


# The speculation runs when the sample expects at most 1/16 of the group below its bracket (amounts ~0.05 here).
# name: (data, amount, alive density, speculates, speculation kept)
SPEC_CASES = {
    "smooth": (lambda: torch.randn(N, generator=torch.Generator().manual_seed(20)), 0.06, 0.85, True, True),
    # zeros (1/33 of the group) below the bracket; the next key holds 2/33: the candidates overflow, the tie
    # quota path takes over after the undo
    "ties": (lambda: torch.randint(-16, 17, (N,), generator=torch.Generator().manual_seed(22)) * 0.125, 0.05, 1.0,
             True, False),
    "missed-high": (lambda: misleading(True), 0.05, 1.0, True, False),  # the log runs out part way, then the miss
    "missed-low": (lambda: misleading(False), 0.05, 1.0, True, False),
    "small": (lambda: torch.randn(1 << 17, generator=torch.Generator().manual_seed(23)), 0.05, 0.85, False, False),
    "too-many": (lambda: torch.randn(N, generator=torch.Generator().manual_seed(24)), 0.1, 0.85, False, True),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SPEC_CASES))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_paths_with_speculation_match_the_reference(case, threads):
    data, amount, density, speculates, kept = SPEC_CASES[case]
    flat = data().float()
    if flat.numel() == N:
        tensors, masks = with_dead(flat, seed=threads, density=density)
    else:
        tensors, masks = [flat], [torch.rand(flat.shape) < density]
    before = ([t.clone() for t in tensors], [m.clone() for m in masks])
    res = run(tensors, masks, dict(amount=amount), threads)
    assert (res["speculated"][0] > 0) == speculates, "not the path this case is meant to test"
    assert bool(res["collected"][0]) == kept
    check_pruned(tensors, masks, before, res, dict(amount=amount))


def sampled_partly_dead(fraction: float, seed: int):
    """Normal weights, all alive but ``fraction`` of the positions the C++ sample reads: (tensors, masks, copies)."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(N, generator=gen)
    alive = torch.ones(N, dtype=torch.bool)
    sampled = sample_positions(N)
    alive[sampled[torch.rand(SAMPLE, generator=gen) < fraction]] = False
    tensors, masks = split(flat, SIZES), split(alive, SIZES)
    return tensors, masks, ([t.clone() for t in tensors], [m.clone() for m in masks])


def test_log_running_out_keeps_what_was_speculated():
    # 60% of the sampled positions dead, every other weight alive: the sample sees 40% of the alive density,
    # so its estimate of the weights below the bracket (the log's size) is well short. The log runs out
    # part way, the bracket still holds: the first parts keep their speculation, the rest take the bits pass.
    tensors, masks, before = sampled_partly_dead(0.6, seed=11)
    res = run(tensors, masks, dict(amount=0.1), threads=2)
    assert res["collected"] == [1]
    assert 0 < res["speculated"][0] < 0.8 * res["k"][0], "the log was meant to run out"
    check_pruned(tensors, masks, before, res, dict(amount=0.1))


@pytest.mark.parametrize("vector", [True, False], ids=["avx2", "scalar"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_weight_after_speculation_puts_everything_back(vector, threads, bad):
    tensors, masks = with_dead(torch.randn(N, generator=torch.Generator().manual_seed(12)), seed=12)
    tensors[2][-9] = bad  # alive, in the last tensor: the other tensors were speculated on before it is read
    masks[2][-9] = True
    before = ([t.clone() for t in tensors], [m.clone() for m in masks])
    with vector_kernels(vector):
        res = run(tensors, masks, dict(amount=0.05), threads)
        assert res["status"] == 1 and res["bad_tensors"] == [2]
        assert (res["speculated"][0] > 0) == vector  # the scalar kernels never speculate
        assert unchanged(tensors, masks, before)
        with pytest.raises(ValueError, match=r"tensor 2 holds NaN or Inf"):
            threshold.prune_(tensors, masks, amount=0.05, zero_weights=True)
        assert unchanged(tensors, masks, before)


def test_k_too_large_after_speculation_puts_everything_back():
    # 95% of the sampled positions dead, the rest all alive: the sample puts a k above the alive count at the
    # top of the alive keys and expects ~5% of the group below its bracket, so the pass speculates (until
    # its log runs out) before the count shows k is too large
    tensors, masks, before = sampled_partly_dead(0.95, seed=13)
    res = run(tensors, masks, dict(k=sum(int(m.sum()) for m in masks) + 1), threads=2)
    assert res["status"] == 2 and res["speculated"][0] > 0
    assert unchanged(tensors, masks, before)


def test_layerwise_groups_undo_every_group_on_a_late_nan():
    gen = torch.Generator().manual_seed(14)
    tensors = [torch.randn(N // 2, generator=gen), torch.randn(N // 2, generator=gen), torch.randn(4000)]
    masks = [torch.rand(t.shape, generator=gen) < 0.9 for t in tensors]
    tensors[2][5] = math.nan
    masks[2][5] = True
    before = ([t.clone() for t in tensors], [m.clone() for m in masks])
    res = run(tensors, masks, dict(amount=[0.05, 0.04, 0.1], layerwise=True), threads=2)
    assert res["status"] == 1 and res["speculated"][0] > 0 and res["speculated"][1] > 0
    assert unchanged(tensors, masks, before)
    tensors[2][5] = 0.5
    before[0][2][5] = 0.5
    spec = dict(amount=[0.05, 0.04, 0.1], layerwise=True)
    res = run(tensors, masks, spec, threads=2)
    assert res["collected"][:2] == [1, 1] and res["speculated"][0] > 0
    check_pruned(tensors, masks, before, res, spec)


def test_speculation_only_for_bool_masks_and_distinct_buffers(monkeypatch):
    seen = []
    real = _backend.ext()

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def select(self, *args):
            res = real.select(*args)
            seen.append(res["speculated"][0] > 0)
            return res

    monkeypatch.setattr(_backend, "ext", lambda: Spy())
    gen = torch.Generator().manual_seed(15)
    w = torch.randn(N // 2, generator=gen)
    m = torch.rand(N // 2, generator=gen) < 0.9
    threshold.prune_([w.clone()], [m.clone()], amount=0.05, zero_weights=True)
    threshold.prune_([w.clone()], [m.clone().to(torch.uint8)], amount=0.05, zero_weights=True)
    threshold.prune_([w.clone()], [m.clone()], amount=0.05)
    shared = w.clone()
    m1, m2 = m.clone(), m.clone()
    threshold.prune_([shared, shared], [m1, m2], amount=0.05, zero_weights=True)
    shared_mask = m.clone()
    threshold.prune_([w.clone(), w.clone()], [shared_mask, shared_mask], amount=0.05, zero_weights=True)
    assert seen == [True, False, False, False, False]
    # the mask passed twice: each copy's ranking counted, its survivors the reference's on both weights
    expected, _, _ = reference.threshold_prune([w, w], [m, m], amount=0.05)
    assert torch.equal(shared_mask, expected[0] & expected[1])
    # the aliased call is still right: each copy pruned by its own mask, the weight zeroed where either was
    expected, _, _ = reference.threshold_prune([w, w], [m, m], amount=0.05)
    assert torch.equal(m1, expected[0]) and torch.equal(m2, expected[1])
    assert torch.equal(bits(shared)[m & ~(m1 & m2)], torch.zeros_like(bits(shared)[m & ~(m1 & m2)]))
    assert torch.equal(bits(shared)[m1 & m2], bits(w)[m1 & m2])


@pytest.mark.parametrize("threads", [1, 3])
def test_scaled_and_mixed_dtype_groups(threads):
    # scales rank a layer by |w| * scale (the bracket is on scaled keys); 16-bit pieces are never speculated,
    # the fp32 pieces of the same group are: the finish must treat each piece by what its pass did
    gen = torch.Generator().manual_seed(16)
    tensors = [torch.randn(s, generator=gen) for s in SIZES]
    tensors[1] = tensors[1].to(torch.bfloat16)
    masks = [torch.rand(s, generator=gen) < 0.85 for s in SIZES]
    before = ([t.clone() for t in tensors], [m.clone() for m in masks])
    scales = [1.0, 0.5, 2.0]
    expected, expected_t, count = reference.threshold_prune(before[0], before[1], amount=0.05, scales=scales)
    res = c_select(tensors, masks, 0.05, threads, scales=scales, zero_weights=True, speculate=True)
    assert res["status"] == 0 and res["speculated"][0] > 0 and res["collected"] == [1]
    assert res["threshold"] == expected_t and res["pruned"] == [count]
    for i, (w, m, w0, m0, want) in enumerate(zip(tensors, masks, before[0], before[1], expected)):
        assert torch.equal(m, want), f"tensor {i}: mask differs from the reference"
        as_bits = (lambda t: t.view(torch.int16)) if w.dtype == torch.bfloat16 else bits
        now = m0 & ~want
        assert not as_bits(w)[now].any() and torch.equal(as_bits(w)[~now], as_bits(w0)[~now]), f"tensor {i}"
