"""Masked layers under torch.autocast (bf16 and fp16) and GradScaler: the op computes in the autocast dtype, the
weight Parameter keeps its dtype, the mask stays bool, pruned gradients stay exactly zero.

Every result is checked elementwise against a float64 oracle with one stated bound,
    |result - oracle| <= 4u * magnitude,
where u is the autocast dtype's unit roundoff (bf16 2^-8, fp16 2^-11) and magnitude is the same computation on
absolute values (|x| |W ⊙ M|^T + |b| for the forward, likewise for each gradient). Two oracles:
(1) float64 on the inputs rounded to the autocast dtype, what the op multiplies: the error left is the rounding of
outputs and of 16-bit partial sums (torch's CPU fp16/bf16 conv backward sums partial products in 16 bits: measured
up to 1.4u * magnitude; the matmuls accumulate in fp32: under 1u). (2) The float32 layer (forward): rounding x and W
costs (1 + u)^2 - 1 <= 3u per product, the output rounding u more. A wrong mask or dtype path is off by O(magnitude).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lthfast import functional, reference
from lthfast.bench.masks import block_mask
from lthfast.nn import MaskedConv2d, MaskedLinear
from lthfast.ops import linear_torch
from lthfast.pruning import mask_optimizer

AMP_DTYPES = [torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.fixture(params=["torch", "triton"])
def any_backend(request):
    if request.param == "triton":
        request.getfixturevalue("triton_backend")
    return request.param


def _assert_within_bound(result, oracle, magnitude, dtype, what):
    bound = 4 * UNIT_ROUNDOFF[dtype] * magnitude + 1e-6  # 1e-6: float32 accumulation of near-cancelling sums
    excess = (result.double() - oracle).abs() - bound
    assert excess.max() <= 0, f"{what} under autocast {dtype} exceeds the bound by {excess.max():.3g}"


def _run64(op, x, w, mask, b, grad):
    """op's output and (dX, dW) in float64 for output gradient ``grad``."""
    x, w = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y = op(x, w, mask, None if b is None else b.detach().double())
    return (y.detach(), *torch.autograd.grad(y, (x, w), grad.double()))


def _check_layer(layer, x, dtype, op):
    """Forward + backward of ``layer`` under CPU autocast; compare with float64 and float32 (see the docstring)."""
    mask_before = layer.mask.clone()
    weight_dtype = layer.weight.dtype
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    assert layer.weight.dtype == weight_dtype and layer.mask.dtype == torch.bool
    assert torch.equal(layer.mask, mask_before)
    grad = torch.randn_like(y)  # autograd hands the op a gradient in the output's dtype
    y.backward(grad)
    assert layer.weight.grad.dtype == weight_dtype and x.grad.dtype == x.dtype
    assert bool((layer.weight.grad[~layer.mask] == 0).all()), "dW must be exactly zero where the mask is False"

    low = lambda t: t.detach().to(dtype)
    oracle = _run64(op, low(x), low(layer.weight), layer.mask, low(layer.bias), grad)
    magnitude = _run64(op, x.abs(), layer.weight.abs(), layer.mask, layer.bias.abs(), grad.abs())
    for what, result, ref, mag in zip(("y", "dX", "dW"), (y, x.grad, layer.weight.grad), oracle, magnitude):
        _assert_within_bound(result, ref, mag, dtype, what)
    with torch.no_grad():
        y32 = layer(x)
    _assert_within_bound(y, y32.double(), magnitude[0], dtype, "y against float32")


@pytest.mark.parametrize("dtype", AMP_DTYPES)
def test_masked_linear_computes_in_the_autocast_dtype(any_backend, dtype):
    layer = MaskedLinear(45, 29, mask=torch.rand(29, 45) < 0.4)
    x = torch.randn(37, 45, requires_grad=True)
    _check_layer(layer, x, dtype, reference.masked_linear)


@pytest.mark.parametrize("dtype", AMP_DTYPES)
def test_masked_conv2d_computes_in_the_autocast_dtype(any_backend, dtype):
    layer = MaskedConv2d(5, 7, 3, padding=1, mask=torch.rand(7, 5, 3, 3) < 0.4)
    x = torch.randn(1, 5, 5, 7, requires_grad=True)  # small: the Triton interpreter runs ~10 s on 2x5x9x11
    _check_layer(layer, x, dtype, lambda x, w, m, b: reference.masked_conv2d(x, w, m, b, padding=1))


def test_block_sparse_cpu_path_computes_in_the_autocast_dtype():
    """The CPU block path (float32 inputs before the autocast rule) must also return the autocast dtype."""
    mask = block_mask(512, 512, 0.95, 32)
    assert linear_torch.plan(mask, 64) is not None, "this case is meant to run the block-sparse path"
    layer = MaskedLinear(512, 512, mask=mask)
    x = torch.randn(64, 512, requires_grad=True)
    _check_layer(layer, x, torch.bfloat16, reference.masked_linear)


def test_bf16_activation_into_a_float32_layer_and_mixed_dtypes_outside_autocast():
    """Autocast layers feed bf16 into the next layer's float32 weight; outside autocast that stays an error."""
    model = nn.Sequential(MaskedConv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), MaskedLinear(4 * 36, 5))
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="bfloat16 but the weight is torch.float32"):
        functional.masked_linear(torch.randn(2, 144, dtype=torch.bfloat16), model[3].weight, model[3].mask)
    with pytest.raises(TypeError, match="must share one floating dtype"):
        functional.masked_conv2d(x.bfloat16(), model[0].weight, model[0].mask)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="float64"):
        functional.masked_linear(torch.randn(2, 144, dtype=torch.float64), model[3].weight, model[3].mask)


def _mlp(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(MaskedLinear(20, 64), nn.ReLU(), MaskedLinear(64, 10))
    for layer in (model[0], model[2]):
        layer.set_mask_(torch.rand_like(layer.weight) < 0.5)
        layer.apply_mask_()
    return model


def _train(model, x, y, steps, amp_dtype=None, scaler=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = mask_optimizer(optimizer, model)
    for _ in range(steps):
        with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    guard.remove()
    return loss.item()


def test_grad_scaler_fp16_training_matches_float32():
    """fp16 autocast + GradScaler for 20 SGD steps: pruned weights stay exactly zero, weights and loss stay
    within 2e-2 of float32 training (fp16 rounds activations to 2^-11; 20 steps of lr 0.1 amplify it to ~1e-3,
    measured; the bound leaves room for other BLAS orders but not for a wrong gradient, which moves them by ~1)."""
    x, y = torch.randn(128, 20), torch.randint(0, 10, (128,))
    fp32, fp16 = _mlp(1), _mlp(1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    loss32 = _train(fp32, x, y, 20)
    loss16 = _train(fp16, x, y, 20, torch.float16, scaler)
    assert scaler.get_scale() == 2.0**12, "no step may have overflowed at this scale"
    assert abs(loss16 - loss32) < 2e-2
    for a, b in zip(fp16, fp32):
        if isinstance(a, MaskedLinear):
            assert a.weight.dtype == torch.float32 and torch.equal(a.mask, b.mask)
            assert bool((a.weight[~a.mask] == 0).all())
            torch.testing.assert_close(a.weight, b.weight, atol=2e-2, rtol=0)


def test_grad_scaler_skips_the_step_when_masked_gradients_overflow():
    """At a scale that overflows fp16 the masked layers' gradients are inf: the step is skipped, the scale cut."""
    model = _mlp(2)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    _train(model, torch.randn(64, 20), torch.randint(0, 10, (64,)), 1, torch.float16, scaler)
    assert not bool(torch.isfinite(model[0].weight.grad).all()), "the scaled fp16 gradient should overflow"
    assert scaler.get_scale() == 2.0**39
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", AMP_DTYPES)
def test_gpu_masked_layers_under_cuda_autocast(triton_backend, dtype):
    cuda = torch.device("cuda")
    linear = MaskedLinear(300, 200, device=cuda, mask=torch.rand(200, 300, device=cuda) < 0.3)
    conv = MaskedConv2d(16, 32, 3, padding=1, device=cuda, mask=torch.rand(32, 16, 3, 3, device=cuda) < 0.3)
    conv_op = lambda x, w, m, b: reference.masked_conv2d(x, w, m, b, padding=1)
    for layer, x, op in (
        (linear, torch.randn(64, 300), reference.masked_linear),
        (conv, torch.randn(4, 16, 12, 12), conv_op),
    ):
        x = x.to(cuda).requires_grad_()
        with torch.autocast("cuda", dtype=dtype):
            y = layer(x)
        assert y.dtype == dtype and layer.weight.dtype == torch.float32 and layer.mask.dtype == torch.bool
        grad = torch.randn_like(y)
        y.backward(grad)
        assert layer.weight.grad.dtype == torch.float32
        assert bool((layer.weight.grad[~layer.mask] == 0).all())
        low = lambda t: t.detach().to(dtype)
        oracle = _run64(op, low(x), low(layer.weight), layer.mask, low(layer.bias), grad)
        magnitude = _run64(op, x.abs(), layer.weight.abs(), layer.mask, layer.bias.abs(), grad.abs())
        for what, result, ref, mag in zip(("y", "dX", "dW"), (y, x.grad, layer.weight.grad), oracle, magnitude):
            _assert_within_bound(result, ref, mag, dtype, what)
