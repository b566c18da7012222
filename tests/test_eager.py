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
    """Three routes, bitwise equal: torch's own ops (the dense route), the autograd.Function (the block route;
    forced here on the others) and the custom op (compile, modes, autocast). 96x200 weights: W ⊙ M under autograd
    is masking's integer multiply (AUTOGRAD_INT_MIN_WEIGHT)."""
    from lthfast.ops import masking

    torch.manual_seed(0)
    n, k = 96, 200
    assert n * k >= masking.AUTOGRAD_INT_MIN_WEIGHT
    if route == "block":
        monkeypatch.setattr(linear_torch, "CPU_MIN_MACS", 0)
        monkeypatch.setattr(linear_torch, "CPU_CROSSOVER", {32: 2.0})
        tiles = torch.rand(3, 7) < 0.4
        m = tiles.repeat_interleave(32, 0).repeat_interleave(32, 1)[:, :k]
    else:
        m = torch.ones(n, k, dtype=torch.bool) if route == "full" else torch.rand(n, k) < 0.6
    x, w, b = torch.randn(2, 7, k), torch.randn(n, k), torch.randn(n)
    calls = []
    eager_fn = linear._Eager.apply
    monkeypatch.setattr(linear._Eager, "apply", lambda *a: calls.append(1) or eager_fn(*a))
    native = run(x, w, m, b)
    assert bool(calls) == (route == "block"), "a dense-route layer runs torch's ops, the block route the Function"
    monkeypatch.setattr(linear, "_eager_route", lambda *a: (False, linear._UNSET))
    calls.clear()
    function = run(x, w, m, b)
    assert calls, "the Function's dense route"
    monkeypatch.setattr(linear, "eager_ok", lambda *a: False)
    calls.clear()
    custom = run(x, w, m, b)
    assert not calls
    for a, c, d in zip(native, function, custom):
        assert torch.equal(a, c) and torch.equal(a, d)


@pytest.mark.usefixtures("triton_backend")
def test_an_eager_kernel_step_decides_its_route_once(monkeypatch):
    """Forward and backward of one plain eager call on the kernels share one tile-index lookup (the Function gets
    the index the routing found, and keeps it for the backward), and give the custom op's bits."""
    torch.manual_seed(3)
    m = (torch.rand(3, 4) < 0.5).repeat_interleave(16, 0).repeat_interleave(16, 1)
    x, w, b = torch.randn(5, 64), torch.randn(48, 64), torch.randn(48)
    lookups = []
    lookup = linear._kernel_index
    monkeypatch.setattr(linear, "_kernel_index", lambda mask: lookups.append(1) or lookup(mask))
    eager = run(x, w, m, b)
    assert len(lookups) == 1
    monkeypatch.setattr(linear, "eager_ok", lambda *a: False)
    lookups.clear()
    custom = run(x, w, m, b)
    assert len(lookups) == 2  # the custom ops decide in each of their bodies
    for a, c in zip(eager, custom):
        assert torch.equal(a, c)


@pytest.mark.usefixtures("triton_backend")
def test_an_eager_conv_kernel_step_decides_its_route_once(monkeypatch):
    """The conv's eager step looks its tile index up once (was four times: routing, forward, dX, dW)."""
    from lthfast.ops import conv

    torch.manual_seed(4)
    m = torch.rand(24, 8, 3, 3) < 0.5
    x, w = torch.randn(2, 8, 7, 7), torch.randn(24, 8, 3, 3)
    lookups = []
    lookup = conv._kernel_index
    monkeypatch.setattr(conv, "_kernel_index", lambda *a: lookups.append(1) or lookup(*a))

    def step():
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = functional.masked_conv2d(xs, ws, m, padding=1)
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
        return y.detach(), xs.grad, ws.grad

    eager = step()
    assert len(lookups) == 1
    monkeypatch.setattr(conv, "eager_ok", lambda *a: False)
    lookups.clear()
    custom = step()
    assert len(lookups) == 3  # each custom op decides in its body
    for a, c in zip(eager, custom):
        assert torch.equal(a, c)


def test_dense_route_without_autograd_gives_the_same_bits(monkeypatch):
    """No autograd (no_grad, or a weight without grad) on the native dense route: W ⊙ M from the integer multiply,
    not torch.where, and the same output bits, a NaN under a pruned weight included."""

    torch.manual_seed(2)
    m = torch.rand(24, 40) < 0.5
    w = torch.randn(24, 40).masked_fill(~m, float("nan")).requires_grad_()
    x, b = torch.randn(5, 40), torch.randn(24)
    expected = functional.masked_linear(x, w, m, b).detach()  # autograd: torch.where
    cm = torch.rand(8, 6, 3, 3) < 0.5
    cw = torch.randn(8, 6, 3, 3).masked_fill(~cm, float("nan")).requires_grad_()
    cx = torch.randn(2, 6, 7, 7)
    expected_conv = functional.masked_conv2d(cx, cw, cm, padding=1).detach()
    monkeypatch.setattr(torch, "where", lambda *a: pytest.fail("torch.where without autograd"))
    with torch.no_grad():
        assert torch.equal(functional.masked_linear(x, w, m, b), expected) and torch.isfinite(expected).all()
        assert torch.equal(functional.masked_conv2d(cx, cw, cm, padding=1), expected_conv)
    assert torch.equal(functional.masked_linear(x, w.detach(), m, b), expected)


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
        y = functional.masked_conv2d(xs, ws, m, bs, stride=2, padding=(1, 2))
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
        return y.detach(), xs.grad, ws.grad, bs.grad

    calls = []
    eager_fn = conv._Eager.apply
    monkeypatch.setattr(conv._Eager, "apply", lambda *a: calls.append(1) or eager_fn(*a))
    native = run_conv()
    assert not calls, "a small layer's dense route runs torch's own ops"
    monkeypatch.setattr(conv, "_eager_route", lambda *a: (False, conv._UNSET))
    function = run_conv()
    assert calls
    monkeypatch.setattr(conv, "eager_ok", lambda *a: False)
    calls.clear()
    custom = run_conv()
    assert not calls
    for a, c, d in zip(native[:3], function[:3], custom[:3]):  # y, dX, dW
        assert torch.equal(a, c) and torch.equal(a, d) and a.stride() == c.stride() == d.stride()
    # db: torch's conv backward reduces dY in its own order, lthfast's Function and custom op with one torch.sum
    torch.testing.assert_close(native[3], function[3], rtol=1e-6, atol=0)
    assert torch.equal(function[3], custom[3])


def test_small_dense_layer_with_a_full_mask_runs_plain_f_linear(monkeypatch):
    """IMP's level 0 on the torch-ops route: the weight itself goes to F.linear, no masking op."""
    seen = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: seen.append(w) or real(x, w, b))
    w, x = torch.randn(6, 8, requires_grad=True), torch.randn(3, 8)
    functional.masked_linear(x, w, torch.ones(6, 8, dtype=torch.bool)).sum().backward()
    assert len(seen) == 1 and seen[0] is w
    torch.testing.assert_close(w.grad, x.sum(0).expand(6, 8))  # d(sum(x W^T))/dW: every row is x summed over rows


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
