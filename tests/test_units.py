"""lthfast.units: U models stacked into one compute what the U models compute, and train as they train."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lthfast
from lthfast import units
from lthfast.models import build_model

SHAPES = {"mlp": (12,), "lenet": (1, 8, 8), "conv2": (3, 8, 8), "vgg11": (3, 8, 8), "resnet20": (3, 8, 8)}


def masked_models(name: str, count: int, density: float = 0.6, dtype=torch.float64) -> list[nn.Module]:
    """``count`` differently initialized and differently masked copies of ``name`` (pruned weights zero)."""
    out = []
    for u in range(count):
        torch.manual_seed(100 + u)
        model = lthfast.sparsify(build_model(name, SHAPES[name], 5, hidden=(16, 8)))
        gen = torch.Generator().manual_seed(u)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (lthfast.nn.MaskedLinear, lthfast.nn.MaskedConv2d)):
                    m.set_mask_(torch.rand(m.weight.shape, generator=gen) < density)
                    m.weight.mul_(m.mask)
                elif isinstance(m, nn.BatchNorm2d):  # per-unit values, so that a unit mixed up with another shows
                    for t in (m.weight, m.bias, m.running_mean):
                        t.copy_(torch.randn(t.shape, generator=gen))
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
        out.append(model.to(dtype).train())
    return out


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_stacked_forward_is_each_models_forward(name):
    models = masked_models(name, 3)
    stacked = units.stack(models)
    xs = torch.randn(3, 4, *SHAPES[name], dtype=torch.float64)
    got = stacked(units.stack_input(xs))
    want = torch.stack([m(xs[u]) for u, m in enumerate(models)])
    assert got.shape == want.shape == (3, 4, 5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _sequential_steps(models, batches, opt_cls, **kw):
    for model, (x, y) in zip(models, batches):
        opt = opt_cls(model.parameters(), model=model, **kw)
        for xb, yb in zip(x, y):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()


def _stacked_steps(stacked, batches, opt_cls, **kw):
    opt = opt_cls(stacked.parameters(), masks=units.masks(stacked), **kw)
    steps = len(batches[0][0])
    for s in range(steps):
        xs = torch.stack([x[s] for x, _ in batches])
        ys = torch.stack([y[s] for _, y in batches])
        opt.zero_grad()
        units.cross_entropy(stacked(units.stack_input(xs)), ys).backward()
        opt.step()


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
@pytest.mark.parametrize(
    "opt_cls, kw",
    [(lthfast.MaskedSGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)), (lthfast.MaskedAdam, dict(lr=1e-2))],
    ids=["sgd", "adam"],
)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)], ids=["f64", "f32"])
def test_stacked_training_is_each_models_training(name, opt_cls, kw, dtype, tol):
    """Three steps of U units stacked against the U units trained one by one, each on its own batches: weights,
    masks and BatchNorm statistics agree (float32: up to summation order); pruned weights stay exactly zero. The
    float32 runs take the fused kernels, the float64 ones torch's step for these optimizers."""
    if dtype is torch.float32 and opt_cls is lthfast.MaskedAdam and name == "resnet20":
        pytest.skip(
            "Adam's g / sqrt(v) of the near-zero gradients behind BatchNorm turns float32 summation-order noise into "
            "updates of up to lr: compared in float64"
        )
    models = masked_models(name, 3, dtype=dtype)
    stacked = units.stack(models)
    batches = [
        (torch.randn(3, 6, *SHAPES[name], dtype=dtype), torch.randint(0, 5, (3, 6)))
        for _ in models
    ]  # fmt: skip
    _sequential_steps(models, batches, opt_cls, **kw)
    _stacked_steps(stacked, batches, opt_cls, **kw)
    for u, model in enumerate(models):
        got = units.unit_state_dict(stacked, u)
        want = model.state_dict()
        assert got.keys() == want.keys()
        for key, value in want.items():
            if value.dtype == torch.bool or key.endswith("num_batches_tracked"):
                assert torch.equal(got[key], value), key
            else:
                scale = max(1.0, float(value.abs().max()))
                assert float((got[key] - value).abs().max()) <= tol * scale, (key, u)
        for key, value in got.items():
            if key.endswith(".mask"):
                assert bool((got[key[: -len("mask")] + "weight"][~value] == 0).all()), key


def test_unit_state_dict_loads_into_the_original_model():
    models = masked_models("conv2", 2)
    stacked = units.stack(models)
    fresh = copy.deepcopy(models[1])
    for p in fresh.parameters():
        p.data.zero_()
    fresh.load_state_dict(units.unit_state_dict(stacked, 1))
    x = torch.randn(2, *SHAPES["conv2"], dtype=torch.float64)
    torch.testing.assert_close(fresh(x), models[1](x), rtol=0, atol=0)
    with pytest.raises(IndexError, match="unit 2 of a stack of 2"):
        units.unit_state_dict(stacked, 2)


def test_stacking_leaves_the_models_alone_and_copies_their_tensors():
    models = masked_models("mlp", 2)
    before = [copy.deepcopy(m.state_dict()) for m in models]
    stacked = units.stack(models)
    with torch.no_grad():
        for p in stacked.parameters():
            p.add_(1.0)
    for m, sd in zip(models, before):
        for key, value in m.state_dict().items():
            assert torch.equal(value, sd[key]), key


def test_refusals_name_the_module():
    a, b = masked_models("mlp", 2)
    other = masked_models("lenet", 1)[0]
    with pytest.raises(units.StackError, match="model 1 is not model 0's architecture"):
        units.stack([a, other])
    with pytest.raises(units.StackError, match="no models"):
        units.stack([])
    pruned = [build_model("mlp", (12,), 5, hidden=(16,)) for _ in range(2)]
    for m in pruned:
        torch.nn.utils.prune.random_unstructured(m.fc1, "weight", 0.5)
    with pytest.raises(units.StackError, match="fc1 is pruned by torch.nn.utils.prune"):
        units.stack(pruned)

    class WithScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.fc(x) * self.scale

    with pytest.raises(units.StackError, match="WithScale.*holds scale"):
        units.stack([WithScale(), WithScale()])
    circular = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")) for _ in range(2)]
    with pytest.raises(units.StackError, match="0 pads with 'circular'"):
        units.stack(circular)


def test_stacked_linear_rejects_a_mismatched_input():
    stacked = units.stack(masked_models("mlp", 2))
    with pytest.raises(ValueError, match="StackedLinear\\(2 units\\)"):
        stacked.fc1(torch.randn(3, 4, 12, dtype=torch.float64))
    assert units.units_of(stacked) == 2
    with pytest.raises(units.StackError, match="not a stacked model"):
        units.units_of(nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_split_and_join_lay_out_tensors_per_unit(name):
    """``split`` gives each unit's part of a tensor laid out as a stacked parameter or buffer (the tensor itself, or
    optimizer state shaped like it) and ``join`` puts the parts back."""
    models = masked_models(name, 3)
    stacked = units.stack(models)
    for key, value in stacked.state_dict().items():
        parts = units.split(stacked, key, value)
        assert len(parts) == 3
        for u, model in enumerate(models):
            assert torch.equal(parts[u], model.state_dict()[key]), (key, u)
        assert torch.equal(units.join(stacked, key, parts), value), key
