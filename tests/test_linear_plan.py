"""MaskedLinear's per-module plan (lthfast.ops.linear.planned): a layer's second call runs the route of its first
without the op's checks, so every change the route or the checks depend on must send the call back to the op.
Each case compares the layer with the float64 oracle after the change; the routes are forced with crossover.force.
"""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import prune

import lthfast
from lthfast import reference
from lthfast.nn import MaskedLinear
from lthfast.ops import crossover, sparse_cpu
from lthfast.ops import linear as linear_op

pytestmark = pytest.mark.skipif(not sparse_cpu.available(), reason="lthfast._C has no sparse kernels")

ATOL, RTOL = 1e-4, 1e-5  # float32 against float64, as tests/test_masked_linear.py


def _layer(n=37, k=70, density=0.05, bias=True) -> MaskedLinear:
    layer = MaskedLinear(k, n, bias=bias)
    mask = torch.rand(n, k) < density
    mask[0, 0] = True
    layer.set_mask_(mask)
    with torch.no_grad():  # a pruned weight that is not zero: the layer must still compute W ⊙ M
        layer.weight.add_(~mask * 3.0)
    return layer


def _check(layer: MaskedLinear, x: torch.Tensor) -> None:
    """Forward and backward of ``layer`` at ``x`` against the float64 oracle; dW exactly zero where pruned."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    w64, m = layer.weight.detach().double(), layer.mask
    b64 = None if layer.bias is None else layer.bias.detach().double()
    x64 = x.detach().double()
    ref_y = reference.masked_linear(x64, w64, m, b64)
    ref_dx, ref_dw, ref_db = reference.masked_linear_backward(
        grad.double().reshape(-1, ref_y.shape[-1]), x64.reshape(-1, x.shape[-1]), w64, m, b64 is not None
    )
    torch.testing.assert_close(y.double(), ref_y, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(x.grad.double(), ref_dx.reshape(x.shape), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(layer.weight.grad.double(), ref_dw, atol=ATOL, rtol=RTOL)
    assert bool((layer.weight.grad[~m] == 0).all())
    if b64 is not None:
        torch.testing.assert_close(layer.bias.grad.double(), ref_db, atol=ATOL, rtol=RTOL)


def _plan(layer):
    return layer.__dict__.get(linear_op.PLAN_ATTR)


@pytest.mark.parametrize("route", ["sparse", "dense"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(17, 70), (1, 70), (2, 5, 70)], ids=["2d", "batch1", "3d"])
def test_planned_calls_match_the_oracle(route, bias, shape):
    layer = _layer(bias=bias)
    with crossover.force(route):
        _check(layer, torch.randn(shape))
        plan = _plan(layer)
        assert plan is not None
        assert plan.route == (linear_op.SPARSE if route == "sparse" else linear_op.PARTIAL)
        for _ in range(2):  # planned calls
            _check(layer, torch.randn(shape))
        assert _plan(layer) is plan


def test_full_mask_plans_the_plain_weight():
    layer = MaskedLinear(70, 37)
    with crossover.force("dense"):
        _check(layer, torch.randn(9, 70))
        assert _plan(layer).route == linear_op.FULL
        _check(layer, torch.randn(9, 70))


def test_sparse_plan_counts_its_kernel_calls(monkeypatch):
    layer = _layer()
    seen = []
    real = sparse_cpu.linear_backward
    monkeypatch.setattr(sparse_cpu, "linear_backward", lambda *a, **k: seen.append(a[4:7]) or real(*a, **k))
    with crossover.force("sparse"):
        layer(torch.randn(4, 70))  # plans
        layer(torch.randn(4, 70)).sum().backward()  # planned: x needs no gradient, so dX is not computed
    assert seen == [(False, True, True)]


@pytest.mark.parametrize(
    "change",
    ["mask in place", "mask.data twice", "mask buffer replaced", "load_state_dict", "rows", "threads", "route",
     "sparse switch", "backend", "bias removed", "bias added"],
)  # fmt: skip
def test_plan_follows_every_change(change):
    layer = _layer()
    x = torch.randn(9, 70)
    before = torch.get_num_threads()
    with crossover.force("sparse"):
        _check(layer, x)
        _check(layer, x)
        new_mask = torch.rand(37, 70) < 0.03
        try:
            if change == "mask in place":
                layer.mask[:, :35] = False
            elif change == "mask.data twice":  # the second storage may take the freed address of the first
                layer.mask.data = new_mask.clone()
                layer.mask.data = torch.rand(37, 70) < 0.03
            elif change == "mask buffer replaced":
                layer.mask = new_mask
            elif change == "load_state_dict":
                layer.load_state_dict({**layer.state_dict(), "mask": new_mask})
            elif change == "rows":
                x = torch.randn(23, 70)
            elif change == "threads":
                torch.set_num_threads(1 if before > 1 else 2)
            elif change == "bias removed":
                layer.bias = None
            elif change == "bias added":
                layer.bias = None
                _check(layer, x)
                layer.bias = torch.nn.Parameter(torch.randn(37))
            if change == "route":
                with crossover.force("dense"):
                    _check(layer, x)
                    assert _plan(layer).route == linear_op.PARTIAL
            elif change == "sparse switch":
                sparse_cpu.ENABLED = False
                try:
                    _check(layer, x)
                    assert _plan(layer).route == linear_op.PARTIAL
                finally:
                    sparse_cpu.ENABLED = True
            elif change == "backend":
                with lthfast.backend("auto"):
                    _check(layer, x)
            else:
                _check(layer, x)
                _check(layer, x)
        finally:
            torch.set_num_threads(before)


def test_a_weight_of_another_dtype_is_refused_by_the_op():
    layer = _layer()
    with crossover.force("sparse"):
        layer(torch.randn(3, 70))
        layer.weight.data = layer.weight.data.double()
        with pytest.raises(TypeError, match=r"MaskedLinear\(in_features=70, out_features=37\)"):
            layer(torch.randn(3, 70))


def test_a_weight_of_another_shape_is_refused_by_the_op():
    layer = _layer()
    with crossover.force("sparse"):
        layer(torch.randn(3, 70))
        layer.weight.data = torch.randn(37, 71)
        with pytest.raises(ValueError, match="MaskedLinear"):
            layer(torch.randn(3, 71))


def test_inputs_the_plan_does_not_cover_take_the_op():
    layer = _layer()
    with crossover.force("sparse"):
        _check(layer, torch.randn(5, 70))
        _check(layer, torch.randn(70, 5).t())  # same shape, other strides: planned, read through its strides
        layer64 = copy.deepcopy(layer).double()
        y = layer64(torch.randn(5, 70, dtype=torch.float64))
        assert y.dtype == torch.float64
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(torch.randn(5, 70)).dtype == torch.bfloat16


@pytest.mark.parametrize("route", ["sparse", "dense"])
def test_no_grad_and_inference_calls(route):
    layer = _layer()
    x = torch.randn(6, 70)
    with crossover.force(route):
        layer(x)
        expected = reference.masked_linear(x.double(), layer.weight.detach().double(), layer.mask,
                                           layer.bias.detach().double())  # fmt: skip
        with torch.no_grad():
            torch.testing.assert_close(layer(x).double(), expected, atol=ATOL, rtol=RTOL)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x).double(), expected, atol=ATOL, rtol=RTOL)


def test_double_backward_through_a_planned_sparse_call():
    layer = _layer()
    x = torch.randn(4, 70)
    with crossover.force("sparse"):
        layer(x)  # plans
        xs = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(layer(xs).pow(2).sum(), xs, create_graph=True)
        gx.pow(2).sum().backward()
    w = layer.weight.detach().double().requires_grad_()
    x64 = x.double().requires_grad_()
    y = F.linear(x64, reference.masked_weight(w, layer.mask), layer.bias.detach().double())
    (gx64,) = torch.autograd.grad(y.pow(2).sum(), x64, create_graph=True)
    gx64.pow(2).sum().backward()
    assert float(w.grad.abs().max()) > 0
    torch.testing.assert_close(layer.weight.grad.double(), w.grad, atol=1e-3, rtol=1e-4)


def test_copies_and_pickles_do_not_carry_the_plan():
    layer = _layer()
    with crossover.force("sparse"):
        layer(torch.randn(3, 70))
        assert _plan(layer) is not None
        clone = copy.deepcopy(layer)
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        unpickled = pickle.loads(pickle.dumps(layer))
        for other in (clone, loaded, unpickled):
            assert _plan(other) is None
            other.mask[:, 10:] = False  # its own mask, not the original's
            _check(other, torch.randn(3, 70))
        _check(layer, torch.randn(3, 70))


def test_torch_prune_on_a_planned_layer_is_followed():
    layer = _layer()
    with crossover.force("sparse"):
        layer(torch.randn(3, 70))
        prune.l1_unstructured(layer, "weight", amount=0.5)
        x = torch.randn(3, 70)
        y = layer(x)
    w = layer.weight_orig.detach() * layer.weight_mask
    torch.testing.assert_close(y, reference.masked_linear(x, w, layer.mask, layer.bias.detach()), atol=ATOL, rtol=RTOL)


def test_mask_changed_between_forward_and_backward_is_an_error():
    layer = _layer()
    with crossover.force("sparse"):
        layer(torch.randn(3, 70))
        y = layer(torch.randn(3, 70, requires_grad=True))
        layer.mask[0, 0] = False
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("route", ["sparse", "dense"])
def test_a_non_finite_pruned_weight_never_leaks(route, poison):
    """The planned dense route multiplies W by the mask as floats (poison * 0 is NaN): a non-finite result is
    recomputed with the exact product, so the planned call still equals the oracle (exact zeros where pruned)."""
    layer = _layer(density=0.5)
    with crossover.force(route):
        layer(torch.randn(9, 70))  # plans
        with torch.no_grad():
            layer.weight[~layer.mask] = poison
        _check(layer, torch.randn(9, 70))
        assert _plan(layer) is not None
