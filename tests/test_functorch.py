"""torch.func transforms over masked layers (per-sample gradients, MAML, influence functions): grad, vmap(grad)
and jvp run the reference composite and agree with plain autograd in float64; gradients are zero where the mask
is False. The custom ops' autograd has no functorch rules, so without the composite every transform failed."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, jvp, vmap

import lthfast


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 5 * 5, 4)
    ).double()
    lthfast.sparsify(model)
    with torch.no_grad():
        for module in (model[0], model[3]):
            module.set_mask_(torch.rand(module.mask.shape) < 0.5)
    return model


def _loss(model, params, buffers, x, y):
    out = functional_call(model, (params, buffers), (x,))
    return torch.nn.functional.cross_entropy(out, y)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_per_sample_gradients_with_vmap_of_grad(backend):
    model = _model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x, y = torch.randn(5, 3, 5, 5, dtype=torch.float64), torch.randint(0, 4, (5,))

    def one(p, xi, yi):
        return _loss(model, p, buffers, xi[None], yi[None])

    with lthfast.backend(backend):
        per_sample = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    for i in range(5):  # plain autograd, one sample at a time
        model.zero_grad()
        with lthfast.backend(backend):
            torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-10, atol=1e-12)
    for name in ("0.weight", "3.weight"):
        mask = buffers[name.replace("weight", "mask")]
        assert torch.count_nonzero(per_sample[name][:, ~mask]) == 0


def test_jvp_matches_the_dense_forward_derivative():
    """d/dt f(W + tT) of the masked model is the plain model's derivative at W * M along T * M."""
    model = _model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    masks = {name: buffers[name.replace("weight", "mask")] for name in ("0.weight", "3.weight")}
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    tangent = {k: torch.randn_like(v) for k, v in params.items()}
    _, got = jvp(lambda p: functional_call(model, (p, buffers), (x,)), (params,), (tangent,))
    plain = lthfast.densify(_model())

    def masked(d):
        return {k: v * masks[k] if k in masks else v for k, v in d.items()}

    _, expected = jvp(lambda p: functional_call(plain, p, (x,)), (masked(params),), (masked(tangent),))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,k", [(4, 6), (256, 128)])  # 256 x 128: the CPU route's integer mask multiply
def test_forward_mode_ad_keeps_the_weight_tangent(n, k):
    """torch.autograd.forward_ad: the tangent of W ⊙ M is T ⊙ M (the integer multiply used to drop it: None)."""
    import torch.autograd.forward_ad as fwad

    torch.manual_seed(1)
    w, t = torch.randn(n, k, dtype=torch.float64), torch.randn(n, k, dtype=torch.float64)
    mask, x = torch.rand(n, k) < 0.5, torch.randn(3, k, dtype=torch.float64)
    conv_w, conv_t = w.view(n, -1, 1, 1)[:, :6], t.view(n, -1, 1, 1)[:, :6]
    image = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    with fwad.dual_level():
        y = lthfast.functional.masked_linear(x, fwad.make_dual(w, t), mask)
        tangent = fwad.unpack_dual(y).tangent
        yc = lthfast.functional.masked_conv2d(image, fwad.make_dual(conv_w, conv_t), mask.view(n, -1, 1, 1)[:, :6])
        conv_tangent = fwad.unpack_dual(yc).tangent
    torch.testing.assert_close(tangent, x @ (t * mask).T, rtol=1e-12, atol=1e-12)
    expected = torch.nn.functional.conv2d(image, conv_t * mask.view(n, -1, 1, 1)[:, :6])
    torch.testing.assert_close(conv_tangent, expected, rtol=1e-12, atol=1e-12)
