"""Bad input: a clear error naming the layer, raised before anything changes (inputs and model untouched)."""

import math

import pytest
import torch
from prune_models import ConvNet, tie_free_

import lthfast
from lthfast import Masks
from lthfast.pruning import strategies as S

GEN = torch.Generator

CALLS = {
    "magnitude": lambda model, masks, f=0.3, **kw: S.magnitude(model, masks, f, **kw),
    "magnitude-layerwise": lambda model, masks, f=0.3, **kw: S.magnitude(model, masks, f, layerwise=True, **kw),
    "one_shot": lambda model, masks, f=0.3, **kw: S.one_shot(model, f, masks=masks, **kw),
    "random": lambda model, masks, f=0.3, **kw: S.random(model, masks, f, generator=GEN(), **kw),
    "block": lambda model, masks, f=0.3, **kw: S.block_magnitude(model, masks, f, block=(4, 4), **kw),
}


@pytest.fixture
def setup():
    model = lthfast.sparsify(tie_free_(ConvNet()))
    masks = Masks({n: torch.rand(p.shape) < 0.7 for n, p in lthfast.prunable(model).items()})
    masks.apply_(model)
    return model, masks


def snapshot(model, masks):
    return masks.clone(), Masks.from_model(model), {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, masks, before):
    old_masks, model_masks, state = before
    assert masks == old_masks and Masks.from_model(model) == model_masks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("fraction", [-0.1, 1.5, math.nan, "0.5"])
def test_bad_fraction(setup, call, fraction):
    model, masks = setup
    before = snapshot(model, masks)
    with pytest.raises((TypeError, ValueError), match="fraction"):
        CALLS[call](model, masks, fraction)
    assert_untouched(model, masks, before)


@pytest.mark.parametrize("call", ["magnitude", "magnitude-layerwise", "one_shot"])
def test_unknown_override_name(setup, call):
    model, masks = setup
    before = snapshot(model, masks)
    with pytest.raises(ValueError, match="'fc9'"):
        CALLS[call](model, masks, overrides={"fc9": 0.1})
    with pytest.raises(ValueError, match="'out.weight'.*multiplier"):
        CALLS[call](model, masks, overrides={"out": "half"})
    with pytest.raises(ValueError, match="out.*fraction must be in"):
        CALLS[call](model, masks, overrides={"out": 1.5})
    assert_untouched(model, masks, before)


@pytest.mark.parametrize("call", list(CALLS))
def test_unknown_leave_dense_name(setup, call):
    model, masks = setup
    with pytest.raises(ValueError, match="'fc9'"):
        CALLS[call](model, masks, leave_dense="fc9")


@pytest.mark.parametrize("call", list(CALLS) + ["n_m"])
@pytest.mark.parametrize(
    "bad, error, match",
    [
        (lambda m: m[:1], ValueError, "shape"),
        (lambda m: m.float(), TypeError, "bool"),
        (lambda m: m.to("meta"), ValueError, "meta"),
    ],
)
def test_bad_mask(setup, call, bad, error, match):
    model, masks = setup
    before = snapshot(model, masks)
    wrong = masks.clone()
    wrong._masks["conv2.weight"] = bad(wrong["conv2.weight"])  # past write validation: the strategy must check
    fn = CALLS.get(call, lambda model, masks, **kw: S.n_m(model, masks))
    with pytest.raises(error, match=f"conv2.weight.*{match}"):
        fn(model, wrong)
    assert_untouched(model, masks, before)


@pytest.mark.parametrize("call", list(CALLS) + ["n_m"])
def test_nan_weights(setup, call):
    model, masks = setup
    with torch.no_grad():
        alive = masks["body.1.weight"].nonzero()[0].tolist()
        model.body[1].weight[tuple(alive)] = math.nan
    before = snapshot(model, masks)
    fn = CALLS.get(call, lambda model, masks, **kw: S.n_m(model, masks))
    with pytest.raises(ValueError, match="body.1.weight.*NaN"):
        fn(model, masks)
    assert torch.isnan(model.body[1].weight).any()
    old_masks, model_masks, _ = before
    assert masks == old_masks and Masks.from_model(model) == model_masks


def test_nan_under_a_pruned_weight_is_ignored(setup):
    model, masks = setup
    with torch.no_grad():
        dead = (~masks["out.weight"]).nonzero()[0].tolist()
        model.out.weight[tuple(dead)] = math.nan
    new = S.magnitude(model, masks, 0.5)
    assert new.alive_count() == masks.alive_count() - round(0.5 * masks.alive_count())


OWN_RATE = {  # the emptied layer asked to prune by a rate of its own: an error
    "magnitude-layerwise": lambda model, masks, f: S.magnitude(model, masks, f, layerwise=True),
    "magnitude-override": lambda model, masks, f: S.magnitude(model, masks, f, overrides={"out": "x0.5"}),
    "one_shot-layerwise": lambda model, masks, f: S.one_shot(model, f, masks=masks, layerwise=True),
    "random-layerwise": lambda model, masks, f: S.random(model, masks, f, generator=GEN(), layerwise=True),
    "block-layerwise": lambda model, masks, f: S.block_magnitude(model, masks, f, block=(4, 4), layerwise=True),
}


@pytest.mark.parametrize("call", list(OWN_RATE))
def test_fully_pruned_layer_asked_to_prune_by_its_own_rate(setup, call):
    model, masks = setup
    masks["out.weight"] = torch.zeros_like(masks["out.weight"])
    masks.apply_(model)
    before = snapshot(model, masks)
    fraction = 0.05 if call.startswith("one_shot") else 0.3
    with pytest.raises(ValueError, match="out.weight.*(fully pruned|already below density)"):  # (one_shot: below)
        OWN_RATE[call](model, masks, fraction)
    assert_untouched(model, masks, before)
    # Leaving it dense (or pruning nothing) is fine.
    name = call.split("-")[0]
    CALLS[name](model, masks, fraction, leave_dense="out", **({"layerwise": True} if name != "one_shot" else {}))
    if not call.startswith("one_shot"):
        assert OWN_RATE[call](model, masks, 0.0) == masks


@pytest.mark.parametrize("call", ["magnitude", "one_shot", "random", "block"])
def test_a_global_ranking_passes_over_a_fully_pruned_layer(setup, call):
    """Global IMP can empty a layer; the next round goes on (as torch's global_unstructured does)."""
    model, masks = setup
    masks["out.weight"] = torch.zeros_like(masks["out.weight"])
    masks.apply_(model)
    before = snapshot(model, masks)
    fraction = 0.05 if call == "one_shot" else 0.3
    new = CALLS[call](model, masks, fraction)
    assert_untouched(model, masks, before)
    assert not new["out.weight"].any()
    if call == "one_shot":  # the ranking's target counts every layer's size, the emptied one's too
        assert new.alive_count() == round(fraction * sum(m.numel() for m in masks.values()))
    elif call == "block":
        assert new.alive_count() < masks.alive_count()
    else:
        assert new.alive_count() == masks.alive_count() - round(fraction * masks.alive_count())
    if call == "magnitude":  # the same masks as a ranking that leaves the emptied layer out
        assert new == S.magnitude(model, masks, fraction, leave_dense="out")


def test_global_imp_goes_on_after_a_layer_is_emptied():
    """The audit's case: a small-magnitude output layer emptied by global 20% rounds; later rounds run."""
    torch.manual_seed(0)
    model = lthfast.sparsify(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)))
    with torch.no_grad():
        model[2].weight.mul_(1e-3)
    for _ in range(3):
        S.magnitude_(model, 0.2)
    masks = Masks.from_model(model)
    assert not masks["2.weight"].any()
    assert masks["0.weight"].sum() == _after(2048 + 128, 3)  # every pruned weight counted, the emptied layer's too


def _after(alive: int, rounds: int) -> int:
    for _ in range(rounds):
        alive -= round(0.2 * alive)
    return alive


def test_generator_required(setup):
    model, masks = setup
    with pytest.raises(TypeError, match="generator"):
        S.random(model, masks, 0.3, generator=3)
    with pytest.raises(TypeError, match="generator"):
        S.rearrange(masks, generator=None)


def test_unknown_mask_name(setup):
    model, masks = setup
    masks["fc9.weight"] = torch.ones(3, dtype=torch.bool)
    with pytest.raises(KeyError, match="fc9.weight"):
        S.magnitude(model, masks, 0.2)
