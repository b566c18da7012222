"""Snapshot: deep copies, rewind keeps current masks, optimizer and RNG state, layouts, errors before changes."""

import io
import random

import numpy
import pytest
import torch
from prune_models import ConvNet, image_batch, tie_free_
from torch import nn
from torch.nn.utils import prune as torch_prune

import lthfast
from lthfast import Masks, Snapshot


def train(model, optimizer, steps=3):
    for _ in range(steps):
        optimizer.zero_grad()
        model(image_batch()).square().mean().backward()
        optimizer.step()


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_snapshot_is_a_copy_not_a_reference():
    model = lthfast.sparsify(tie_free_(ConvNet()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, optimizer, 1)
    expected = state_copy(model)
    expected_opt = {k: v.clone() for k, v in optimizer.state[model.out.weight].items()}
    snap = Snapshot(model, optimizer)
    train(model, optimizer)
    assert not torch.equal(model.out.weight.detach(), expected["out.weight"])  # training did change the model
    for key, value in snap.model_state.items():
        assert torch.equal(value, expected[key]), key
    assert "out.mask" not in snap.model_state
    saved_opt = snap.optimizer_state["state"]
    assert any(torch.equal(s["momentum_buffer"], expected_opt["momentum_buffer"]) for s in saved_opt.values())


def test_rewind_restores_weights_and_keeps_current_masks():
    model = lthfast.sparsify(tie_free_(ConvNet()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    init = state_copy(model)
    snap = Snapshot(model, optimizer)
    train(model, optimizer)
    masks = Masks({n: torch.rand(p.shape) < 0.4 for n, p in lthfast.prunable(model).items()})
    masks.apply_(model)
    params = {id(p) for p in model.parameters()}
    snap.rewind_(model, optimizer)
    assert Masks.from_model(model) == masks
    assert {id(p) for p in model.parameters()} == params
    for key, value in model.state_dict().items():
        if key.endswith("mask"):
            continue
        name = key if key.endswith("weight") else None
        expected = torch.where(masks[name], init[key], 0.0) if name in masks else init[key]
        assert torch.equal(value, expected), key
    assert optimizer.state_dict()["state"] == {}  # the snapshot was taken before the first step


def test_rewind_optimizer_state_zeroes_pruned_entries():
    model = lthfast.sparsify(tie_free_(ConvNet()))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, optimizer, 2)
    snap = Snapshot(model, optimizer)
    saved = {k: v.clone() for k, v in optimizer.state[model.out.weight].items()}
    train(model, optimizer)
    masks = Masks({n: torch.rand(p.shape) < 0.4 for n, p in lthfast.prunable(model).items()})
    masks.apply_(model)
    snap.rewind_(model, optimizer)
    state = optimizer.state[model.out.weight]
    keep = masks["out.weight"]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key], torch.where(keep, saved[key], 0.0)), key
    assert torch.equal(state["step"], saved["step"])


def test_rewind_a_model_whose_bias_was_pruned_after_the_snapshot():
    import lthfast.prune as fast_prune

    torch.manual_seed(6)
    model = lthfast.sparsify(nn.Sequential(nn.Linear(6, 4)))
    snap = Snapshot(model)
    initial = model[0].bias.detach().clone()
    fast_prune.l1_unstructured(model[0], "bias", amount=0.5)
    with torch.no_grad():
        model[0].bias_orig.add_(1.0)  # "training"
    snap.rewind_(model)
    assert torch.equal(model[0].bias_orig, initial)
    assert torch.equal(model[0].bias, initial * model[0].bias_mask)


def test_rng_state_is_restored_when_asked():
    model = tie_free_(ConvNet())
    snap = Snapshot(model, rng=True)
    expected = (torch.rand(5), random.random(), numpy.random.rand())
    torch.rand(100)
    snap.rewind_(model)
    assert torch.equal(torch.rand(5), expected[0])
    assert random.random() == expected[1] and numpy.random.rand() == expected[2]
    no_rng = Snapshot(model)
    first = torch.rand(3)
    no_rng.rewind_(model)
    assert not torch.equal(torch.rand(3), first)


def test_state_dict_roundtrip_through_torch_save():
    model = lthfast.sparsify(tie_free_(ConvNet()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, optimizer, 1)
    snap = Snapshot(model, optimizer, rng=True, step=7)
    buffer = io.BytesIO()
    torch.save(snap.state_dict(), buffer)
    buffer.seek(0)
    loaded = Snapshot.from_state_dict(torch.load(buffer, weights_only=False))
    assert loaded.step == 7
    other = lthfast.sparsify(tie_free_(ConvNet()))
    loaded.rewind_(other)
    for key, value in snap.model_state.items():
        assert torch.equal(other.state_dict()[key], value)


def test_rewind_across_layouts():
    """A snapshot of the unpruned model rewinds into its sparsified and its torch-pruned versions."""
    model = tie_free_(ConvNet())
    init = state_copy(model)
    snap = Snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    params = [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    torch_prune.global_unstructured(params, torch_prune.L1Unstructured, amount=0.5)
    masks = Masks.from_model(model)
    snap.rewind_(model)
    assert torch.equal(model.out.weight_orig, torch.where(masks["out.weight"], init["out.weight"], 0.0))
    assert torch.equal(model.out.weight, model.out.weight_orig * model.out.weight_mask)
    lthfast.from_torch_prune(model)
    Snapshot(model).rewind_(model)
    assert Masks.from_model(model) == masks


def test_rewind_mismatch_raises_before_writing():
    model = lthfast.sparsify(tie_free_(ConvNet()))
    snap = Snapshot(model)
    other = lthfast.sparsify(tie_free_(ConvNet()))
    other.out = lthfast.sparsify(nn.Linear(32, 7))
    before = state_copy(other)
    with pytest.raises(ValueError, match="out.weight"):
        snap.rewind_(other)
    after = state_copy(other)
    assert all(torch.equal(after[k], before[k]) for k in before)
    other.extra = nn.Linear(2, 2)
    other.out = lthfast.sparsify(nn.Linear(32, 10))
    with pytest.raises(KeyError, match="extra.weight"):
        snap.rewind_(other)
    with pytest.raises(ValueError, match="optimizer"):
        snap.rewind_(model, torch.optim.SGD(model.parameters(), lr=0.1))
