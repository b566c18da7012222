"""Magnitude, one-shot and random strategies: exact counts, masks only shrink, ranking, overrides, seeds."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prune_models import ConvNet, mlp, tie_free_

import lthfast
from lthfast import Masks
from lthfast.pruning import strategies as S


def weights_of(model):
    return {n: p.detach() for n, p in lthfast.prunable(model).items()}


def random_masks(model, density=0.7):
    return Masks({n: torch.rand(p.shape) < density for n, p in lthfast.prunable(model).items()})


def assert_shrinks(new, old):
    assert list(new) == list(old)
    for name in old:
        assert not (new[name] & ~old[name]).any(), f"{name}: a pruned weight came back"


def newly_pruned_and_kept(model, new, old, names=None):
    w = weights_of(model)
    names = names or list(old)
    pruned = torch.cat([w[n][old[n] & ~new[n]].abs().reshape(-1) for n in names])
    kept = torch.cat([w[n][new[n]].abs().reshape(-1) for n in names])
    return pruned, kept


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.97, 1.0])
def test_global_magnitude_exact_count_and_ranking(convnet, fraction):
    old = random_masks(convnet)
    new = S.magnitude(convnet, old, fraction)
    assert_shrinks(new, old)
    assert new.alive_count() == old.alive_count() - round(fraction * old.alive_count())
    pruned, kept = newly_pruned_and_kept(convnet, new, old)
    if pruned.numel() and kept.numel():
        assert pruned.max() < kept.min()


def test_layerwise_magnitude_exact_per_layer(convnet):
    old = random_masks(convnet)
    new = S.magnitude(convnet, old, 0.3, layerwise=True)
    for name in old:
        alive = int(old[name].sum())
        assert int(new[name].sum()) == alive - round(0.3 * alive)
        pruned, kept = newly_pruned_and_kept(convnet, new, old, [name])
        assert pruned.max() < kept.min()


@settings(max_examples=25, deadline=None)
@given(
    fraction=st.floats(0.0, 1.0),
    rows=st.integers(1, 13),
    cols=st.integers(1, 17),
    density=st.floats(0.05, 1.0),
    layerwise=st.booleans(),
)
def test_magnitude_property(fraction, rows, cols, density, layerwise):
    model = torch.nn.Sequential(torch.nn.Linear(cols, rows), torch.nn.Linear(rows, 3))
    old = random_masks(model, density)
    for m in old.values():
        m.view(-1)[0] = True  # at least one alive weight per layer
    new = S.magnitude(model, old, fraction, layerwise=layerwise)
    assert_shrinks(new, old)
    if layerwise:
        for name in old:
            alive = int(old[name].sum())
            assert int(new[name].sum()) == alive - round(fraction * alive)
    else:
        assert new.alive_count() == old.alive_count() - round(fraction * old.alive_count())


def test_density_after_n_rounds(convnet):
    masks, p, alive = Masks.ones(convnet), 0.2, None
    alive = masks.alive_count()
    for n in range(1, 9):
        masks = S.magnitude(convnet, masks, p)
        alive -= round(p * alive)
        assert masks.alive_count() == alive
        assert abs(masks.density() - (1 - p) ** n) < n / masks.total_count()


def test_ties_are_deterministic_and_exact():
    model = mlp()
    with torch.no_grad():
        for p in lthfast.prunable(model).values():
            p.copy_(torch.randint(-3, 4, p.shape).float())  # heavy ties, zeros included
    old = random_masks(model)
    first = S.magnitude(model, old, 0.45)
    assert first == S.magnitude(model, old, 0.45)
    assert first.alive_count() == old.alive_count() - round(0.45 * old.alive_count())
    pruned, kept = newly_pruned_and_kept(model, first, old)
    assert pruned.max() <= kept.min()


def test_overrides_and_leave_dense(convnet):
    old = random_masks(convnet)
    new = S.magnitude(convnet, old, 0.4, overrides={"out": "x0.5", "conv*": "0.1"}, leave_dense=["body.1"])
    assert torch.equal(new["body.1.weight"], old["body.1.weight"])
    for name, rate in (("out.weight", 0.2), ("conv1.weight", 0.1), ("conv2.weight", 0.1)):
        alive = int(old[name].sum())
        assert int(new[name].sum()) == alive - round(rate * alive), name
    # No layer left in the shared ranking: only overrides and dense layers.
    assert_shrinks(new, old)
    shared = S.magnitude(convnet, old, 0.4, overrides={"out": "*0.5"})
    others = ["conv1.weight", "conv2.weight", "body.1.weight"]
    alive = sum(int(old[n].sum()) for n in others)
    assert sum(int(shared[n].sum()) for n in others) == alive - round(0.4 * alive)
    pruned, kept = newly_pruned_and_kept(convnet, shared, old, others)
    assert pruned.max() < kept.min()


@pytest.mark.parametrize("layerwise", [False, True])
def test_one_shot_reaches_density(convnet, layerwise):
    masks = S.one_shot(convnet, 0.13, layerwise=layerwise)
    total = masks.total_count()
    if layerwise:
        for m in masks.values():
            assert int(m.sum()) == round(0.13 * m.numel())
    else:
        assert masks.alive_count() == round(0.13 * total)
    again = S.one_shot(convnet, 0.05, masks=masks, layerwise=layerwise, leave_dense="conv1")
    assert_shrinks(again, masks)
    assert torch.equal(again["conv1.weight"], masks["conv1.weight"])
    with pytest.raises(ValueError, match="out.weight.*below"):
        S.one_shot(convnet, 0.05, masks=masks, overrides={"out": 0.9})


def test_one_shot_overrides(convnet):
    masks = S.one_shot(convnet, 0.1, overrides={"out": "0.5", "conv1": "x0.5"})
    assert int(masks["out.weight"].sum()) == round(0.5 * masks["out.weight"].numel())
    assert int(masks["conv1.weight"].sum()) == round((1 - 0.5 * 0.9) * masks["conv1.weight"].numel())
    shared = ["conv2.weight", "body.1.weight"]
    assert sum(int(masks[n].sum()) for n in shared) == round(0.1 * sum(masks[n].numel() for n in shared))


def test_one_shot_equals_iterated_magnitude_ranking(convnet):
    """One shot at density d keeps exactly the largest round(d * total) magnitudes."""
    masks = S.one_shot(convnet, 0.25)
    w = torch.cat([p.abs().reshape(-1) for p in weights_of(convnet).values()])
    keep = torch.cat([m.reshape(-1) for m in masks.values()])
    assert w[keep].min() > w[~keep].max()


def test_random_counts_and_seeds(convnet):
    old = random_masks(convnet)
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    new = S.random(convnet, old, 0.3, generator=gen(0))
    assert_shrinks(new, old)
    assert new.alive_count() == old.alive_count() - round(0.3 * old.alive_count())
    assert new == S.random(convnet, old, 0.3, generator=gen(0))
    assert new != S.random(convnet, old, 0.3, generator=gen(1))
    layer = S.random(convnet, old, 0.3, generator=gen(0), layerwise=True, leave_dense="out")
    for name in old:
        alive = int(old[name].sum())
        expected = alive if name == "out.weight" else alive - round(0.3 * alive)
        assert int(layer[name].sum()) == expected


def test_random_global_spreads_in_proportion():
    model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 300))
    new = S.random(model, None, 0.5, generator=torch.Generator().manual_seed(3))
    # Hypergeometric: the small layer's density has a standard deviation of 0.0043; 0.03 is 7 of them.
    for density in new.layer_density().values():
        assert abs(density - 0.5) < 0.03


def test_random_like_and_rearrange(convnet):
    ref = S.magnitude(convnet, None, 0.6)
    for fn in (lambda g: S.random_like(ref, generator=g), lambda g: S.rearrange(ref, generator=g)):
        out = fn(torch.Generator().manual_seed(5))
        assert out == fn(torch.Generator().manual_seed(5))
        assert out != ref
        for name in ref:
            assert out[name].shape == ref[name].shape and int(out[name].sum()) == int(ref[name].sum())


def test_strategies_do_not_modify_inputs(convnet):
    model = lthfast.sparsify(convnet)
    masks = random_masks(model)
    masks.apply_(model)
    before_masks, before_w = masks.clone(), {n: w.clone() for n, w in weights_of(model).items()}
    model_masks = Masks.from_model(model)
    S.magnitude(model, masks, 0.5)
    S.one_shot(model, 0.1, masks=masks)
    S.random(model, masks, 0.5, generator=torch.Generator())
    assert masks == before_masks and Masks.from_model(model) == model_masks
    assert all(torch.equal(w, before_w[n]) for n, w in weights_of(model).items())


def test_float64_models_rank_too():
    model = tie_free_(ConvNet()).double()
    masks = S.magnitude(model, None, 0.5)
    assert masks.alive_count() == masks.total_count() - round(0.5 * masks.total_count())


def test_the_module_shows_only_its_strategies():
    """``lthfast.strategies`` lists its strategy functions, not the torch / typing / check helpers it imports."""
    public = {"magnitude", "magnitude_", "one_shot", "random", "random_like", "rearrange", "block_magnitude", "n_m",
              "block_prune", "block_random_like", "block_rearrange", "n_m_prune", "n_m_random_like"}  # fmt: skip
    assert set(S.__all__) == public and set(dir(lthfast.strategies)) == public
    namespace: dict = {}
    exec("from lthfast.pruning.strategies import *", namespace)
    assert set(namespace) - {"__builtins__"} == public and all(callable(namespace[n]) for n in public)
