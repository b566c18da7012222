"""lthfast.prune as a drop-in for torch.nn.utils.prune: every name it does not define is torch's (its private
helpers included), so custom BasePruningMethod subclasses written in torch's own style run after the import change."""

import copy

import pytest
import torch
from prune_models import ConvNet, tie_free_
from torch import nn
from torch.nn.utils import prune as torch_prune

import lthfast.prune as prune

HELPERS = (
    "_validate_pruning_amount_init", "_validate_pruning_amount", "_compute_nparams_toprune", "_compute_norm",
    "_validate_pruning_dim", "_validate_structured_pruning",
)  # fmt: skip


class SmallestUnstructured(prune.BasePruningMethod):
    """torch's documentation style: the helpers are reached through the ``prune`` module."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount):
        prune._validate_pruning_amount_init(amount)
        self.amount = amount

    def compute_mask(self, t, default_mask):
        tensor_size = t.nelement()
        nparams_toprune = prune._compute_nparams_toprune(self.amount, tensor_size)
        prune._validate_pruning_amount(nparams_toprune, tensor_size)
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        if nparams_toprune:
            mask.view(-1)[torch.topk(t.abs().view(-1), k=nparams_toprune, largest=False).indices] = 0
        return mask


class WeakestRows(prune.BasePruningMethod):
    """A structured method: removes the ``amount`` rows of smallest L1 norm along ``dim``."""

    PRUNING_TYPE = "structured"

    def __init__(self, amount, dim=0):
        prune._validate_pruning_amount_init(amount)
        self.amount, self.dim = amount, dim

    def compute_mask(self, t, default_mask):
        prune._validate_structured_pruning(t)
        prune._validate_pruning_dim(t, self.dim)
        size = t.shape[self.dim]
        nparams_toprune = prune._compute_nparams_toprune(self.amount, size)
        prune._validate_pruning_amount(nparams_toprune, size)
        norm = prune._compute_norm(t, 1, self.dim)
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        if nparams_toprune:
            rows = torch.topk(norm, k=nparams_toprune, largest=False).indices
            index = [slice(None)] * t.dim()
            index[self.dim] = rows
            mask[tuple(index)] = 0
        return mask


def test_torch_private_helpers_are_torchs():
    for name in HELPERS:
        assert getattr(prune, name) is getattr(torch_prune, name)
        assert name in dir(prune)
    with pytest.raises(AttributeError, match="lthfast.prune.*no attribute 'no_such_helper'"):
        prune.no_such_helper  # noqa: B018


@pytest.mark.parametrize("amount", [0.3, 7])
def test_custom_unstructured_method_in_torch_style(amount):
    ours = tie_free_(ConvNet())
    theirs = copy.deepcopy(ours)
    SmallestUnstructured.apply(ours.out, "weight", amount=amount)
    torch_prune.l1_unstructured(theirs.out, "weight", amount=amount)
    assert torch.equal(ours.out.weight_mask, theirs.out.weight_mask)
    assert int((ours.out.weight_mask == 0).sum()) == torch_prune._compute_nparams_toprune(amount, 320)
    # Through lthfast's global_unstructured (a method it has no fast path for): torch's computation, same masks.
    targets = lambda m: [(m.conv1, "weight"), (m.body[1], "weight")]  # noqa: E731
    prune.global_unstructured(targets(ours), SmallestUnstructured, amount=amount)
    torch_prune.global_unstructured(targets(theirs), torch_prune.L1Unstructured, amount=amount)
    for (a, _), (b, _) in zip(targets(ours), targets(theirs)):
        assert torch.equal(a.weight_mask, b.weight_mask)
    with pytest.raises(ValueError, match="amount"):
        SmallestUnstructured(amount=1.5)


def test_custom_structured_method_in_torch_style():
    layer = tie_free_(nn.Sequential(nn.Linear(12, 9)))[0]
    norms = layer.weight.detach().abs().sum(1)
    WeakestRows.apply(layer, "weight", amount=0.34, dim=0)
    pruned_rows = (layer.weight_mask == 0).all(1)
    assert int(pruned_rows.sum()) == round(0.34 * 9)
    assert torch.equal(pruned_rows, norms <= norms.sort().values[2])  # the three rows of smallest norm
    with pytest.raises(IndexError, match="Invalid index 3"):  # _validate_pruning_dim
        WeakestRows.apply(nn.Linear(4, 4), "weight", amount=1, dim=3)


def test_a_subclass_of_l1_unstructured_goes_through_its_own_compute_mask():
    """The fast path is for torch's L1Unstructured itself; a subclass's compute_mask is called."""
    calls = []

    class Logged(prune.L1Unstructured):
        def compute_mask(self, t, default_mask):
            calls.append(t.shape)
            return super().compute_mask(t, default_mask)

    ours = tie_free_(ConvNet())
    theirs = copy.deepcopy(ours)
    prune.global_unstructured([(ours.out, "weight")], Logged, amount=0.4)
    torch_prune.global_unstructured([(theirs.out, "weight")], torch_prune.L1Unstructured, amount=0.4)
    assert calls and torch.equal(ours.out.weight_mask, theirs.out.weight_mask)
