"""strategies.magnitude_: in place on the model's own masks, the same masks and weights as the functional
``magnitude(...).apply_(model)`` (fast path: one threshold call that also zeroes what it prunes; other models:
the functional route), every check before any change, and the masked layers' caches following the new masks."""

import copy

import pytest
import torch
from prune_models import ConvNet, image_batch, mlp, tie_free_
from torch import nn

import lthfast
from lthfast.pruning import strategies


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def functional_round(model, fraction, **kw):
    masks = lthfast.Masks.from_model(model)
    strategies.magnitude(model, masks or None, fraction, **kw).apply_(model)


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize(
    "kw", [{}, dict(leave_dense=("out",)), dict(overrides={"out": "x0.5", "conv*": 0.1}, leave_dense="conv2")]
)
def test_fast_path_matches_functional_over_rounds(layerwise, kw):
    torch.manual_seed(0)
    fast = lthfast.sparsify(ConvNet())  # random weights: ties unlikely, every round exercises ranking
    slow = copy.deepcopy(fast)
    for _ in range(4):
        strategies.magnitude_(fast, 0.3, layerwise=layerwise, **kw)
        functional_round(slow, 0.3, layerwise=layerwise, **kw)
        assert_same_state(fast, slow)
        with torch.no_grad():  # training moves the alive weights between rounds
            for a, b in zip(fast.parameters(), slow.parameters()):
                step = torch.randn_like(a) * 0.01
                a.add_(step)
                b.add_(step)
            for m, n in zip(fast.modules(), slow.modules()):
                if isinstance(m, lthfast.nn.MaskedLinear | lthfast.nn.MaskedConv2d):
                    m.weight.mul_(m.mask)
                    n.weight.mul_(n.mask)
    density = lthfast.Masks.from_model(fast)
    assert 0 < density.alive_count() < density.total_count()


def test_fast_path_zeroes_only_what_it_prunes():
    torch.manual_seed(1)
    model = lthfast.sparsify(mlp())
    strategies.magnitude_(model, 0.5)
    before = state(model)
    masks_before = lthfast.Masks.from_model(model)
    strategies.magnitude_(model, 0.5)
    for name, m in lthfast.Masks.from_model(model).items():
        module = name.rsplit(".", 1)[0]
        w, w0, m0 = model.state_dict()[name], before[name], masks_before[name]
        assert torch.equal(w[~m], torch.zeros_like(w[~m])), name
        assert torch.equal(w[m], w0[m]), name
        assert int((m0 & ~m).sum()) > 0 and torch.equal(before[module + ".mask"] | m, m0)


def build(kind):
    torch.manual_seed(2)
    model = tie_free_(ConvNet())
    if kind == "torch-pruned":  # (deepcopy fails on torch-pruned modules: built twice instead)
        from torch.nn.utils import prune as torch_prune

        for m in model.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                torch_prune.l1_unstructured(m, "weight", 0.2)
    elif kind == "float64":
        model = lthfast.sparsify(model.double())
    return model


@pytest.mark.parametrize("kind", ["plain", "torch-pruned", "float64"])
def test_other_models_take_the_functional_route(kind):
    kw = dict(overrides={"out": "x0.5"})
    model, reference = build(kind), build(kind)
    assert strategies.magnitude_(model, 0.4, **kw) is model
    functional_round(reference, 0.4, **kw)
    assert_same_state(model, reference)
    if kind != "plain":  # (a plain model holds no masks: its pruned weights are zeroed)
        assert lthfast.Masks.from_model(model).alive_count() < lthfast.Masks.from_model(build(kind)).alive_count()


def test_layers_compute_with_the_new_masks():
    torch.manual_seed(3)
    layer = lthfast.nn.MaskedLinear.from_dense(nn.Linear(1024, 1024, bias=False))
    model = nn.Sequential(layer)
    with torch.no_grad():
        tiles = torch.rand(32, 32) < 0.1  # block-sparse: the CPU block path and its cached plan run
        layer.mask.copy_(tiles.repeat_interleave(32, 0).repeat_interleave(32, 1))
    x = torch.randn(512, 1024)
    model(x)
    strategies.magnitude_(model, 0.5)
    expected = torch.nn.functional.linear(x.double(), (layer.weight * layer.mask).double())
    torch.testing.assert_close(model(x).double(), expected, atol=1e-4, rtol=1e-5)


def test_errors_before_any_change():
    torch.manual_seed(4)
    model = lthfast.sparsify(ConvNet())
    with pytest.raises(ValueError, match="fraction|amount"):
        strategies.magnitude_(model, 1.5)
    with torch.no_grad():
        model.out.weight[0, 0] = float("nan")
    saved = state(model)
    with pytest.raises(ValueError, match="out.weight.*NaN"):
        strategies.magnitude_(model, 0.2)
    for layerwise in (False, True):  # the overridden layer's NaN is found before the shared ranking writes
        with pytest.raises(ValueError, match="out.weight.*(NaN|finite)"):
            strategies.magnitude_(model, 0.2, overrides={"out": "x0.5"}, layerwise=layerwise)
    for k, v in model.state_dict().items():
        assert torch.equal(v.nan_to_num(7.0), saved[k].nan_to_num(7.0)), f"{k} changed before the error"
    with torch.no_grad():
        model.out.weight[0, 0] = 1.0
        model.conv1.mask.zero_()
    saved, alive = state(model), lthfast.Masks.from_model(model).alive_count()
    for kwargs in ({"layerwise": True}, {"overrides": {"conv1": 0.1}}):  # its own rate; a global ranking passes it over
        with pytest.raises(ValueError, match="conv1.weight.*fully pruned"):
            strategies.magnitude_(model, 0.2, **kwargs)
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    strategies.magnitude_(model, 0.2)
    assert not model.conv1.mask.any() and lthfast.Masks.from_model(model).alive_count() < alive
    with pytest.raises(ValueError, match="leave_dense"):
        strategies.magnitude_(model, 0.2, leave_dense="nope")


def test_forward_runs_after_pruning():
    model = lthfast.sparsify(ConvNet())
    strategies.magnitude_(model, 0.5)
    assert model(image_batch()).isfinite().all()


def test_alive_flags_match_any_alive():
    from lthfast.pruning.layers import alive_flags, any_alive

    masks = []
    for n in (0, 1, 63, 64, 65, 4097, 100_003):
        for where in (None, 0, n - 1, n // 2):
            m = torch.zeros(n, dtype=torch.bool)
            if where is not None and n:
                m[where] = True  # one alive entry at the start, the end or the middle (or none)
            masks.append(m)
    wide = torch.zeros(50, 40, dtype=torch.bool)
    wide[49, 1] = True
    masks += [wide[:, ::2], wide[:, 1::2], wide.t(), wide.to(torch.uint8).view(torch.bool)]  # strided: torch
    assert alive_flags(masks) == [any_alive(m) for m in masks] == [bool(m.any()) for m in masks]


class _OwnLinear(nn.Linear):
    """A subclass of nn.Linear (as nn.MultiheadAttention's out_proj is): sparsify leaves it as it is."""


@pytest.mark.parametrize("mixed", [False, True])
def test_layers_without_a_mask_are_pruned_by_zeroing_round_after_round(mixed):
    """A plain layer's zeros are its pruned weights: each round prunes 20% of what is still alive, in one global
    ranking with the masked layers (it used to re-rank its own zeros, or to be left out once any mask existed)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), _OwnLinear(20, 10))
    if mixed:
        with pytest.warns(UserWarning, match="not converting subclasses"):
            lthfast.sparsify(model)
    weights = [model[0].weight, model[2].weight]
    alive = sum(w.numel() for w in weights)
    for _ in range(3):
        held = [model[0].mask if mixed else weights[0] != 0, weights[1] != 0]
        expected = strategies.magnitude(model, dict(zip(["0.weight", "2.weight"], held)), 0.2)
        strategies.magnitude_(model, 0.2)
        alive -= round(0.2 * alive)
        now = [model[0].mask if mixed else weights[0] != 0, weights[1] != 0]
        assert sum(int(m.sum()) for m in now) == alive
        assert torch.equal(now[0], expected["0.weight"]) and torch.equal(now[1], expected["2.weight"])
        assert torch.count_nonzero(weights[0][~now[0]]) == 0
    assert int(now[1].sum()) < 200  # the subclass took part in the ranking
