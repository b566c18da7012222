"""lthfast.prune: torch.nn.utils.prune's masks and layout on tie-free models, with no growth over rounds."""

import copy

import pytest
import torch
from prune_models import ConvNet, image_batch, tie_free_
from torch import nn
from torch.nn.utils import prune as torch_prune

import lthfast
import lthfast.prune as fast_prune


def targets(model):
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def twins():
    model = tie_free_(ConvNet())
    return model, copy.deepcopy(model)


def assert_same_pruning(ours, theirs):
    assert set(ours.state_dict()) == set(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    for (a, _), (b, _) in zip(targets(ours), targets(theirs)):
        assert torch.equal(a.weight, b.weight)
        assert a.weight_mask.dtype == b.weight_mask.dtype


@pytest.mark.parametrize("amount", [0.2, 0.5, 300])
def test_global_unstructured_matches_torch_over_rounds(amount):
    ours, theirs = twins()
    for _ in range(4):
        fast_prune.global_unstructured(targets(ours), pruning_method=fast_prune.L1Unstructured, amount=amount)
        torch_prune.global_unstructured(targets(theirs), pruning_method=torch_prune.L1Unstructured, amount=amount)
        assert_same_pruning(ours, theirs)
        x = image_batch()
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_numpy_amounts_count_as_torch_does():
    """round(amount * alive) in the amount's own arithmetic: a float32 0.01 of 150 alive weights is 2 for torch
    (1.5000001 rounds up) and was 1 here (1.5 in float64 rounds half to even)."""
    np = pytest.importorskip("numpy")
    for amount in (np.float32(0.01), np.float32(0.3), np.float64(0.25)):
        ours, theirs = nn.Linear(15, 10), nn.Linear(15, 10)
        theirs.load_state_dict(ours.state_dict())
        fast_prune.global_unstructured([(ours, "weight")], pruning_method=fast_prune.L1Unstructured, amount=amount)
        torch_prune.global_unstructured([(theirs, "weight")], pruning_method=torch_prune.L1Unstructured, amount=amount)
        assert torch.equal(ours.weight_mask, theirs.weight_mask), amount
    assert int((ours.weight_mask == 0).sum()) == round(np.float64(0.25) * 150)


def test_parameters_as_lists_or_any_pairs():
    ours, theirs = twins()
    pairs = [[m, name] for m, name in targets(ours)]  # torch unpacks any pair
    fast_prune.global_unstructured(pairs, pruning_method=fast_prune.L1Unstructured, amount=0.3)
    torch_prune.global_unstructured(targets(theirs), pruning_method=torch_prune.L1Unstructured, amount=0.3)
    assert_same_pruning(ours, theirs)
    with pytest.raises(TypeError, match=r"parameters\[0\]: expected a \(module, name\) pair"):
        fast_prune.global_unstructured([(ours.conv1,)], pruning_method=fast_prune.L1Unstructured, amount=0.3)


def test_no_growth_over_rounds():
    ours, theirs = twins()
    for _ in range(5):
        fast_prune.global_unstructured(targets(ours), fast_prune.L1Unstructured, amount=0.2)
        torch_prune.global_unstructured(targets(theirs), torch_prune.L1Unstructured, amount=0.2)
    for module, _ in targets(ours):
        hooks = list(module._forward_pre_hooks.values())
        assert len(hooks) == 1 and isinstance(hooks[0], fast_prune.InPlaceMask)
        assert not [v for v in vars(hooks[0]).values() if isinstance(v, torch.Tensor)]
    # torch keeps one full-size mask per round in a growing container (pytorch/pytorch#49332).
    container = next(iter(theirs.out._forward_pre_hooks.values()))
    assert len(container) == 5


def test_mask_buffer_updated_in_place_and_remove_works():
    ours, theirs = twins()
    fast_prune.global_unstructured(targets(ours), fast_prune.L1Unstructured, amount=0.3)
    buffer = ours.out.weight_mask
    fast_prune.global_unstructured(targets(ours), fast_prune.L1Unstructured, amount=0.3)
    assert ours.out.weight_mask is buffer
    torch_prune.global_unstructured(targets(theirs), torch_prune.L1Unstructured, amount=0.3)
    torch_prune.global_unstructured(targets(theirs), torch_prune.L1Unstructured, amount=0.3)
    for module, name in targets(ours):
        fast_prune.remove(module, name)
    for module, name in targets(theirs):
        torch_prune.remove(module, name)
    assert_state_equal(ours, theirs)


def assert_state_equal(a, b):
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_importance_scores_and_mixing_with_torch():
    ours, theirs = twins()
    scores = {(m, "weight"): torch.rand(m.weight.shape) for m, _ in targets(ours)}
    their_scores = {(b, "weight"): scores[(a, "weight")] for (a, _), (b, _) in zip(targets(ours), targets(theirs))}
    fast_prune.global_unstructured(targets(ours), fast_prune.L1Unstructured, importance_scores=scores, amount=0.4)
    torch_prune.global_unstructured(
        targets(theirs), torch_prune.L1Unstructured, importance_scores=their_scores, amount=0.4
    )
    assert_same_pruning(ours, theirs)
    # A model pruned by torch first continues with lthfast.
    torch_prune.global_unstructured(targets(ours), torch_prune.L1Unstructured, amount=0.3)
    fast_prune.global_unstructured(targets(ours), fast_prune.L1Unstructured, amount=0.3)
    torch_prune.global_unstructured(targets(theirs), torch_prune.L1Unstructured, amount=0.3)
    torch_prune.global_unstructured(targets(theirs), torch_prune.L1Unstructured, amount=0.3)
    assert_same_pruning(ours, theirs)


def test_l1_unstructured_matches_torch():
    ours, theirs = twins()
    for _ in range(3):
        fast_prune.l1_unstructured(ours.conv2, "weight", amount=0.3)
        torch_prune.l1_unstructured(theirs.conv2, "weight", amount=0.3)
        assert torch.equal(ours.conv2.weight_mask, theirs.conv2.weight_mask)
    fast_prune.l1_unstructured(ours.out, "bias", amount=4)
    torch_prune.l1_unstructured(theirs.out, "bias", amount=4)
    assert torch.equal(ours.out.bias_mask, theirs.out.bias_mask)


def test_random_unstructured_counts():
    ours, _ = twins()
    fast_prune.global_unstructured(targets(ours), fast_prune.RandomUnstructured, amount=0.25)
    total = sum(m.weight.numel() for m, _ in targets(ours))
    assert sum(int(m.weight_mask.sum()) for m, _ in targets(ours)) == total - round(0.25 * total)
    fast_prune.random_unstructured(ours.out, "weight", amount=10)
    alive = int(ours.out.weight_mask.sum())
    fast_prune.random_unstructured(ours.out, "weight", amount=0.5)
    assert int(ours.out.weight_mask.sum()) == alive - round(0.5 * alive)


def test_other_unstructured_methods_use_torch_computation():
    ours, theirs = twins()
    fast_prune.global_unstructured(targets(ours), fast_prune.L1Unstructured, amount=0.3)
    fast_prune.global_unstructured(targets(ours), fast_prune.Identity)
    torch_prune.global_unstructured(targets(theirs), torch_prune.L1Unstructured, amount=0.3)
    assert_same_pruning(ours, theirs)


def test_float64_model_matches_torch():
    ours, theirs = twins()
    ours.double(), theirs.double()
    for _ in range(2):
        fast_prune.global_unstructured(targets(ours), fast_prune.L1Unstructured, amount=0.3)
        torch_prune.global_unstructured(targets(theirs), torch_prune.L1Unstructured, amount=0.3)
    assert_same_pruning(ours, theirs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"amount": -0.1}, ValueError, "amount"),
        ({"amount": 1.5}, ValueError, "amount"),
        ({"amount": 10**9}, ValueError, "amount"),
        ({"amount": "a"}, TypeError, "amount"),
    ],
)
def test_bad_amount_changes_nothing(kwargs, error, match):
    ours, _ = twins()
    fast_prune.global_unstructured(targets(ours), fast_prune.L1Unstructured, amount=0.2)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(error, match=match):
        fast_prune.global_unstructured(targets(ours), fast_prune.L1Unstructured, **kwargs)
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())


def test_bad_parameters_change_nothing():
    ours, _ = twins()
    with torch.no_grad():
        ours.out.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"parameters\[3\].*Linear.weight.*NaN"):
        fast_prune.global_unstructured(targets(ours), fast_prune.L1Unstructured, amount=0.2)
    with torch.no_grad():
        ours.out.weight[0, 0] = 0.5
    with pytest.raises(AttributeError, match="'nope'"):
        fast_prune.global_unstructured(
            [(ours.conv1, "weight"), (ours.conv1, "nope")], fast_prune.L1Unstructured, amount=0.2
        )
    with pytest.raises(TypeError, match="structured"):
        fast_prune.global_unstructured(targets(ours), fast_prune.LnStructured, amount=0.2, n=1, dim=0)
    assert not torch_prune.is_pruned(ours)


def test_drop_in_then_convert_to_masked_modules():
    ours, theirs = twins()
    fast_prune.global_unstructured(targets(ours), fast_prune.L1Unstructured, amount=0.6)
    torch_prune.global_unstructured(targets(theirs), torch_prune.L1Unstructured, amount=0.6)
    x = image_batch()
    expected = theirs(x)
    lthfast.from_torch_prune(ours)
    torch.testing.assert_close(ours(x), expected, rtol=1e-6, atol=1e-6)
    assert lthfast.Masks.from_model(ours).density() == pytest.approx(0.4, abs=1e-3)
