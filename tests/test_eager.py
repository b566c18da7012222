"""lthfast.ops.eager: plain eager calls of masked_linear skip the custom-op dispatch and run the same functions
through an autograd.Function. Both routes must give bitwise-equal outputs and gradients, and the custom ops must
still be what compile / autocast / dispatch modes / functorch see."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lthfast import functional
from lthfast.ops import eager, linear, linear_torch


def run(x, w, m, b):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = functional.masked_linear(x, w, m, b)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("route", ["dense", "full", "block"])
def test_eager_and_custom_op_routes_agree_bitwise(route, monkeypatch):
    torch.manual_seed(0)
    n, k = 96, 160
    if route == "block":
        monkeypatch.setattr(linear_torch, "CPU_MIN_MACS", 0)
        monkeypatch.setattr(linear_torch, "CPU_CROSSOVER", {32: 2.0})
        tiles = torch.rand(3, 5) < 0.4
        m = tiles.repeat_interleave(32, 0).repeat_interleave(32, 1)
    else:
        m = torch.ones(n, k, dtype=torch.bool) if route == "full" else torch.rand(n, k) < 0.6
    x, w, b = torch.randn(2, 7, k), torch.randn(n, k), torch.randn(n)
    calls = []
    eager_fn = linear._Eager.apply
    monkeypatch.setattr(linear._Eager, "apply", lambda *a: calls.append(1) or eager_fn(*a))
    first = run(x, w, m, b)
    assert calls, "a plain eager call must take the eager route"
    monkeypatch.setattr(linear, "eager_ok", lambda *a: False)
    calls.clear()
    second = run(x, w, m, b)
    assert not calls
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv_eager_and_custom_op_routes_agree_bitwise(layout, monkeypatch):
    from lthfast.ops import conv

    torch.manual_seed(1)
    x, w, b = torch.randn(2, 6, 9, 11), torch.randn(8, 6, 3, 3), torch.randn(8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    m = torch.rand(8, 6, 3, 3) < 0.6

    def run_conv():
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y = functional.masked_conv2d(xs, ws, m, bs, stride=2, padding=1)
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
        return y.detach(), xs.grad, ws.grad, bs.grad

    calls = []
    eager_fn = conv._Eager.apply
    monkeypatch.setattr(conv._Eager, "apply", lambda *a: calls.append(1) or eager_fn(*a))
    first = run_conv()
    assert calls
    monkeypatch.setattr(conv, "eager_ok", lambda *a: False)
    calls.clear()
    second = run_conv()
    assert not calls
    for a, c in zip(first, second):
        assert torch.equal(a, c) and a.stride() == c.stride()


def test_custom_op_route_under_modes_and_autocast():
    x, w, m = torch.randn(4, 8), torch.randn(6, 8), torch.rand(6, 8) < 0.5
    assert eager.eager_ok(x, w, m, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not eager.eager_ok(x, w, m, None)
        assert functional.masked_linear(x, w, m).dtype == torch.bfloat16  # the op's registered cast rule ran
    with FlopCounterMode(display=False):
        assert not eager.eager_ok(x, w, m, None)
    assert eager.eager_ok(x, torch.nn.Parameter(w), m, None)  # parameters are plain tensors

    class Sub(torch.Tensor):
        pass

    assert not eager.eager_ok(x.as_subclass(Sub), w, m, None)  # subclasses may override dispatch: custom op
    seen = []
    torch.func.vmap(lambda t: seen.append(eager.eager_ok(t)) or t)(x)
    assert seen == [False]
