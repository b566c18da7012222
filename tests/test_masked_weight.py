"""reference.masked_weight: the integer-multiply route gives exactly torch.where's bits, NaN/Inf/-0.0 included."""

import pytest
import torch

from lthfast import reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_fast_route_equals_where_bitwise(dtype, monkeypatch):
    w = torch.randn(37, 53, dtype=torch.float64).to(dtype)
    w[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
    mask = torch.rand(37, 53) < 0.5
    mask[0, :2] = False  # NaN and +Inf pruned: must become +0.0
    mask[0, 2:4] = True  # -Inf and -0.0 kept as they are
    expected = torch.where(mask, w, torch.zeros((), dtype=dtype))
    monkeypatch.setattr(torch, "where", lambda *a: pytest.fail("the integer route must not call torch.where"))
    got = reference.masked_weight(w, mask)
    assert got.dtype == dtype and got.shape == w.shape
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[w.element_size()]
    assert torch.equal(got.view(ints), expected.view(ints))


def test_strided_weight_and_autograd_route():
    w = torch.randn(40, 60)[:, ::2]
    mask = torch.rand(40, 30) < 0.3
    torch.testing.assert_close(reference.masked_weight(w, mask), w * mask, rtol=0, atol=0)
    leaf = torch.randn(8, 9, requires_grad=True)
    m = torch.rand(8, 9) < 0.5
    reference.masked_weight(leaf, m).sum().backward()  # the autograd route: gradient is the mask
    assert torch.equal(leaf.grad, m.float())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_ops_masking_gives_the_reference_bits_from_cached_mask_bits(dtype, monkeypatch):
    from lthfast.ops import masking

    w = torch.randn(37, 53, dtype=torch.float64).to(dtype)
    w[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
    mask = torch.rand(37, 53) < 0.5
    mask[0, :2] = False
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[w.element_size()]
    expected = reference.masked_weight(w, mask).view(ints)
    assert torch.equal(masking.masked(w, mask).view(ints), expected)
    out = torch.full_like(w, 7.0)
    assert masking.masked(w, mask, out=out) is out and torch.equal(out.view(ints), expected)
    t = w.clone()
    assert masking.mask_(t, mask) is t and torch.equal(t.view(ints), expected)  # in place when contiguous
    bits = masking.mask_bits(mask, ints)
    assert bits.dtype == ints and masking.mask_bits(mask, ints) is bits  # cached on the mask ...
    mask[5, 5] = not bool(mask[5, 5])  # ... and dropped when it changes in place
    again = masking.mask_bits(mask, ints)
    assert again is not bits and torch.equal(again, mask.to(ints))
    assert torch.equal(masking.masked(w, mask).view(ints), reference.masked_weight(w, mask).view(ints))
    strided = w.t()  # not contiguous: a new tensor, same bits
    assert torch.equal(masking.mask_(strided, mask.t()).view(ints), reference.masked_weight(w, mask).t().view(ints))


def _poisoned(shape, dtype, seed):
    """A weight with NaN / Inf under pruned entries and a -0.0 / -Inf kept, and its mask (about half alive)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(shape, generator=g) < 0.5
    flat_w, flat_m = w.view(-1), mask.view(-1)
    flat_w[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
    flat_m[:4] = torch.tensor([False, False, True, True])
    return w, mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 300), (9, 7), (64, 32, 3, 3)])
def test_ops_masking_under_autograd_gives_where_bits_forward_and_backward(dtype, shape, monkeypatch):
    """masked() under autograd: torch.where below AUTOGRAD_INT_MIN_WEIGHT weights (on CPU), the integer multiply
    in _MaskedWeight from there on; either way torch.where's bits in the product and in the weight's gradient
    (dW = dY ⊙ M: +0.0 under a pruned entry even where dY is NaN), and a gradient that autograd can differentiate
    again."""
    from lthfast.ops import masking

    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[torch.empty((), dtype=dtype).element_size()]
    w, mask = _poisoned(shape, dtype, seed=3)
    grad = torch.randn(shape, dtype=torch.float64).to(dtype)
    grad.view(-1)[:2] = float("nan")  # under the pruned NaN and +Inf: their gradient must still be +0.0
    leaf = w.clone().requires_grad_()
    expected = torch.where(mask, leaf, torch.zeros((), dtype=dtype))
    expected.backward(grad)
    expected_grad = leaf.grad.clone()
    leaf.grad = None
    big = w.numel() >= masking.AUTOGRAD_INT_MIN_WEIGHT
    if big:
        monkeypatch.setattr(torch, "where", lambda *a: pytest.fail("the integer route must not call torch.where"))
    got = masking.masked(leaf, mask)
    assert got.requires_grad and (type(got.grad_fn).__name__ == "_MaskedWeightBackward") == big
    if not big:  # where's zero is made once per dtype and device, and stays zero
        zero = masking._zeros[(dtype, leaf.device)]
        assert masking._zero(dtype, leaf.device) is zero and zero.item() == 0 and zero.dim() == 0
    got.backward(grad)
    assert torch.equal(got.detach().view(ints), expected.detach().view(ints))
    assert torch.equal(leaf.grad.view(ints), expected_grad.view(ints))
    monkeypatch.undo()
    if dtype == torch.float64:  # linear in the weight: the second derivative of sum(masked(w) * v) is zero
        w64 = torch.randn(shape, dtype=dtype, requires_grad=True)
        v = torch.randn(shape, dtype=dtype, requires_grad=True)
        (gw,) = torch.autograd.grad((masking.masked(w64, mask) * v).sum(), w64, create_graph=True)
        assert torch.equal(gw, torch.where(mask, v, 0).detach())
        (gv,) = torch.autograd.grad(gw.sum(), v)  # d/dv sum(v ⊙ M) = M
        assert torch.equal(gv, mask.to(dtype))
        small_w, small_m = torch.randn(5, 6, dtype=dtype, requires_grad=True), torch.rand(5, 6) < 0.5
        assert torch.autograd.gradcheck(lambda t: masking._MaskedWeight.apply(t, small_m), (small_w,))


def test_ops_masking_under_autograd_refuses_a_mask_changed_before_backward():
    """The mask is saved for backward as torch.where saves its condition: an in-place change in between (a prune
    step run before the backward) is an error, not a gradient under the wrong mask."""
    from lthfast.ops import masking

    w = torch.randn(masking.AUTOGRAD_INT_MIN_WEIGHT, requires_grad=True)
    mask = torch.rand(w.shape) < 0.5
    y = masking.masked(w, mask)
    assert type(y.grad_fn).__name__ == "_MaskedWeightBackward"
    mask[0] = not bool(mask[0])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
