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
