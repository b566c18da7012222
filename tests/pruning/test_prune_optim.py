"""mask_optimizer: pruned weights and their optimizer state stay exactly zero, including right after a prune."""

import pytest
import torch
from prune_models import ConvNet, image_batch, tie_free_
from torch import nn
from torch.nn.utils import prune as torch_prune

import lthfast
from lthfast import Masks

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def train(model, optimizer, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        model(image_batch()).square().mean().backward()
        optimizer.step()
        yield


def random_masks(model, density=0.5):
    return Masks({n: torch.rand(p.shape) < density for n, p in lthfast.prunable(model).items()})


def assert_pruned_zero(model, optimizer, masks):
    for name, param in lthfast.prunable(model).items():
        pruned = ~masks[name]
        assert torch.count_nonzero(param.detach()[pruned]) == 0, name
        for key, value in optimizer.state[param].items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                assert torch.count_nonzero(value[pruned]) == 0, (name, key)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_pruned_weights_stay_zero_after_prune_with_momentum(name):
    model = lthfast.sparsify(tie_free_(ConvNet()))
    optimizer = OPTIMIZERS[name](model.parameters())
    handle = lthfast.mask_optimizer(optimizer, model)
    for _ in train(model, optimizer, 3):  # dense training builds momentum / moments everywhere
        pass
    masks = random_masks(model)
    masks.apply_(model)  # prune while momentum exists at the now-pruned entries
    for _ in train(model, optimizer, 10):
        assert_pruned_zero(model, optimizer, masks)
    assert Masks.from_model(model) == masks
    handle.remove()


def test_without_the_guard_pruned_weights_drift():
    """The control: the same scenario without mask_optimizer moves pruned weights (so the test above can fail)."""
    model = lthfast.sparsify(tie_free_(ConvNet()))
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    for _ in train(model, optimizer, 3):
        pass
    masks = random_masks(model)
    masks.apply_(model)
    for _ in train(model, optimizer, 2):
        pass
    with pytest.raises(AssertionError):
        assert_pruned_zero(model, optimizer, masks)


def test_handle_remove_stops_the_guard():
    model = lthfast.sparsify(tie_free_(ConvNet()))
    optimizer = OPTIMIZERS["adamw"](model.parameters())
    lthfast.mask_optimizer(optimizer, model).remove()
    for _ in train(model, optimizer, 2):
        pass
    masks = random_masks(model)
    masks.apply_(model)
    for _ in train(model, optimizer, 2):
        pass
    with pytest.raises(AssertionError):
        assert_pruned_zero(model, optimizer, masks)


def test_torch_pruned_layout_is_guarded():
    model = tie_free_(ConvNet())
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    lthfast.mask_optimizer(optimizer, model)
    for _ in train(model, optimizer, 2):
        pass
    params = [(m, "weight") for m in (model.conv1, model.conv2, model.body[1], model.out)]
    torch_prune.global_unstructured(params, torch_prune.L1Unstructured, amount=0.5)  # registered after the guard
    masks = Masks.from_model(model)
    for _ in train(model, optimizer, 5):
        assert_pruned_zero(model, optimizer, masks)


def test_plain_model_guarded_with_explicit_masks():
    model = tie_free_(ConvNet())
    optimizer = OPTIMIZERS["adam"](model.parameters())
    masks = random_masks(model)
    masks.apply_(model)
    lthfast.mask_optimizer(optimizer, model, masks)
    for _ in train(model, optimizer, 5):
        assert_pruned_zero(model, optimizer, masks)


def test_bad_masks_are_rejected():
    model = tie_free_(ConvNet())
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    with pytest.raises(KeyError, match="fc9.weight"):
        lthfast.mask_optimizer(optimizer, model, {"fc9.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="out.weight"):
        lthfast.mask_optimizer(optimizer, model, {"out.weight": torch.ones(2, dtype=torch.bool)})
    assert not optimizer._optimizer_step_post_hooks


def _guard_of(optimizer, handle):
    return optimizer._optimizer_step_post_hooks[handle.id]


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "masked-adam"])
def test_gradient_on_pruned_weights_is_still_zeroed(name):
    """A loss on the stored weights themselves gives pruned entries a gradient: the guard must see it."""
    model = lthfast.sparsify(tie_free_(ConvNet()))
    if name == "masked-adam":
        optimizer = lthfast.MaskedAdam(model.parameters(), lr=1e-2, model=model)
    else:
        optimizer = OPTIMIZERS[name](model.parameters())
    masks = random_masks(model, 0.3)
    masks.apply_(model)
    lthfast.mask_optimizer(optimizer, model)
    for step in range(6):
        optimizer.zero_grad()
        loss = model(image_batch()).square().mean()
        if step >= 2:  # after steps that let the guard take its cheap path
            loss = loss + sum(p.sum() for p in lthfast.prunable(model).values())
        loss.backward()
        optimizer.step()
        assert_pruned_zero(model, optimizer, masks)


@pytest.mark.parametrize("name", ["adam", "sgd-nesterov"])
def test_guard_skips_the_zeroing_while_nothing_can_move_pruned_weights(name, monkeypatch):
    model = lthfast.sparsify(nn.Sequential(nn.Linear(400, 200), nn.ReLU(), nn.Linear(200, 10)))
    masks = random_masks(model, 0.02)
    masks.apply_(model)
    optimizer = OPTIMIZERS[name](model.parameters())
    handle = lthfast.mask_optimizer(optimizer, model)
    calls = []
    real = lthfast.pruning.optim.zero_pruned_
    monkeypatch.setattr(lthfast.pruning.optim, "zero_pruned_", lambda t, m: calls.append(t.shape) or real(t, m))

    def step():
        optimizer.zero_grad()
        model(torch.randn(7, 400)).square().mean().backward()
        optimizer.step()

    step()
    assert len(calls) > 0  # the first step zeroes weights and the state it created
    calls.clear()
    for _ in range(4):
        step()
    expect_cheap = lthfast._backend.ext_loaded() and hasattr(lthfast._backend.ext(), "pruned_grads_zero")
    assert (calls == []) == expect_cheap
    assert _guard_of(optimizer, handle).skipped == (8 if expect_cheap else 0)
    assert_pruned_zero(model, optimizer, masks)
    with torch.no_grad():
        model[0].weight.fill_(0.5)  # written outside the optimizer: the next step zeroes it again
    calls.clear()
    step()
    assert model[0].weight.shape in calls
    assert_pruned_zero(model, optimizer, masks)


def test_guard_always_zeroes_for_other_optimizers(monkeypatch):
    class MyAdam(torch.optim.Adam):  # a subclass may step pruned weights however it likes
        pass

    model = lthfast.sparsify(tie_free_(ConvNet()))
    random_masks(model, 0.2).apply_(model)
    optimizer = MyAdam(model.parameters(), lr=1e-2)
    handle = lthfast.mask_optimizer(optimizer, model)
    for _ in train(model, optimizer, 3):
        pass
    assert _guard_of(optimizer, handle).skipped == 0


def test_optimizer_of_another_model_is_refused():
    model, other = lthfast.sparsify(tie_free_(ConvNet())), lthfast.sparsify(tie_free_(ConvNet()))
    optimizer = OPTIMIZERS["adam"](other.parameters())
    with pytest.raises(ValueError, match="none of the model's masked weights .*conv1.weight.*out.weight"):
        lthfast.mask_optimizer(optimizer, model)
    plain = tie_free_(ConvNet())
    with pytest.raises(ValueError, match="none of the model's nn.Linear/nn.Conv2d weights"):
        lthfast.mask_optimizer(optimizer, plain)
    assert not optimizer._optimizer_step_post_hooks and not optimizer._optimizer_step_pre_hooks
    handle = lthfast.mask_optimizer(optimizer, other)
    handle.remove()
    assert not optimizer._optimizer_step_post_hooks and not optimizer._optimizer_step_pre_hooks


@pytest.mark.skipif(not hasattr(lthfast._backend.ext(), "pruned_grads_zero"), reason="lthfast._C without the check")
@pytest.mark.parametrize("vector", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_pruned_gradient_check(dtype, vector):
    """The guard's read-only check: +-0 everywhere pruned passes; one tiny value at a pruned entry fails, in the
    vector body and the tail of any length."""
    ext = lthfast._backend.ext()
    previous = ext.optim_vector_kernels(vector)
    try:
        for n in (1, 31, 33, 70001):
            mask = torch.rand(n) < 0.5
            mask[-1] = False
            grad = torch.randn(n).to(dtype) * mask
            grad[~mask & (torch.arange(n) % 3 == 0)] = -0.0
            tiny = torch.finfo(dtype).tiny / 4  # a subnormal: nonzero bits
            bad = grad.clone()
            bad[-1] = tiny
            bad_body = grad.clone()
            bad_body[int(torch.nonzero(~mask)[0])] = -tiny
            buffers = [grad, bad, bad_body]
            got = ext.pruned_grads_zero(
                [b.data_ptr() for b in buffers], [mask.data_ptr()] * 3, [n] * 3, [b.element_size() for b in buffers], 2
            )
            assert got == [True, False, False], n
    finally:
        ext.optim_vector_kernels(previous)
