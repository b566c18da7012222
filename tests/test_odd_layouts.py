"""Inputs in layouts the kernels do not assume: a strided or expanded bias, a row-broadcast (expanded) mask, a
mask whose memory format differs from the weight's. Values against float64 torch on W ⊙ M."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lthfast
from lthfast.functional import masked_conv2d, masked_linear
from lthfast.indexing.tiles import build_tile_index

BIASES = {
    "strided": lambda n: (torch.arange(2.0 * n) / n)[::2],
    "expanded": lambda n: torch.tensor(0.5).expand(n),
}


@pytest.mark.parametrize("bias_kind", list(BIASES))
@pytest.mark.parametrize("op", ["linear", "conv"])
def test_a_non_contiguous_bias_on_the_triton_kernels(op, bias_kind, triton_backend):
    torch.manual_seed(0)
    bias = BIASES[bias_kind](32)
    assert not bias.is_contiguous()
    with lthfast.backend("triton"):
        if op == "linear":
            x, w, m = torch.randn(5, 24), torch.randn(32, 24), torch.rand(32, 24) < 0.5
            got = masked_linear(x, w, m, bias)
            expected = F.linear(x.double(), torch.where(m, w, 0).double(), bias.double())
        else:
            x, w, m = torch.randn(2, 6, 5, 5), torch.randn(32, 6, 3, 3), torch.rand(32, 6, 3, 3) < 0.5
            got = masked_conv2d(x, w, m, bias, 1, 1)
            expected = F.conv2d(x.double(), torch.where(m, w, 0).double(), bias.double(), 1, 1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_a_row_broadcast_mask_is_indexed_and_computed():
    """An expanded mask (row stride 0) used to reach the C++ tile index, which refused it."""
    torch.manual_seed(1)
    mask = (torch.rand(1, 512) < 0.5).expand(512, 512)
    index, reference = build_tile_index(mask, 32, 32), build_tile_index(mask.contiguous(), 32, 32)
    assert torch.equal(index.tile_alive, reference.tile_alive) and torch.equal(index.row_cols, reference.row_cols)
    x, w = torch.randn(32, 512), torch.randn(512, 512)  # M*N*K >= 2**23: the CPU route builds its block plan
    expected = F.linear(x.double(), torch.where(mask, w, 0).double())
    torch.testing.assert_close(masked_linear(x, w, mask).double(), expected, rtol=1e-5, atol=1e-4)


def test_conv_output_follows_x_and_the_weight_not_the_mask():
    torch.manual_seed(2)
    x, w = torch.randn(2, 4, 7, 6), torch.randn(16, 4, 3, 3, requires_grad=True)
    mask = (torch.rand(16, 4, 3, 3) < 0.5).to(memory_format=torch.channels_last)
    y = masked_conv2d(x, w, mask, None, 1, 1)
    expected = F.conv2d(x, torch.where(mask, w, 0).detach().contiguous(), None, 1, 1)
    assert y.stride() == expected.stride() and y.is_contiguous()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
