"""Second derivatives (double backward, gradient penalties) through the routes whose backward is lthfast's own:
the CPU block-sparse route and the Triton kernels. Their backward is not differentiable, so under create_graph=True
the eager Function differentiates the torch composite instead; it used to hand back gradients that the second
derivative took as constants (a gradient penalty's term was silently dropped)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lthfast
from lthfast.functional import masked_conv2d, masked_linear
from lthfast.ops import linear_torch


def _tile_mask(rows: int, cols: int, tile: int, alive: list[tuple[int, int]]) -> torch.Tensor:
    tiles = torch.zeros(-(-rows // tile), -(-cols // tile), dtype=torch.bool)
    for r, c in alive:
        tiles[r, c] = True
    return tiles.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:rows, :cols].contiguous()


def _penalised_grads(f, x, w):
    """d/d(x, w) of |dL/dx|^2 + sum(y) with L = sum(y^2): needs the second derivative of f."""
    y = f(x, w)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    return torch.autograd.grad(gx.pow(2).sum() + y.sum(), (x, w))


@pytest.fixture
def block_route(monkeypatch):
    """The CPU block-sparse route on a small problem (any tile density), float64 on its torch products."""
    monkeypatch.setattr(linear_torch, "CPU_MIN_MACS", 0)
    monkeypatch.setattr(linear_torch, "CPU_CROSSOVER", {32: 2.0})
    monkeypatch.setattr(linear_torch, "CPU_CROSSOVER_TORCH", {32: 2.0})
    calls = []
    real = linear_torch.backward
    monkeypatch.setattr(linear_torch, "backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_linear_block_route(block_route):
    torch.manual_seed(0)
    mask = _tile_mask(96, 64, 32, [(0, 0), (2, 1)])
    x = torch.randn(40, 64, dtype=torch.float64, requires_grad=True)
    w = torch.randn(96, 64, dtype=torch.float64, requires_grad=True)
    with lthfast.backend("torch"):
        got = _penalised_grads(lambda x, w: masked_linear(x, w, mask), x, w)
        masked_linear(x, w, mask).sum().backward()  # a plain backward still takes the block route's own
    assert block_route, "the block route did not run"
    expected = _penalised_grads(lambda x, w: F.linear(x, torch.where(mask, w, 0)), x, w)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-8)
    assert torch.count_nonzero(got[1][~mask]) == 0
    with lthfast.backend("torch"):
        torch.autograd.gradgradcheck(lambda x, w: masked_linear(x, w, mask), (x[:3], w))


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_triton_kernels(op, triton_backend):
    torch.manual_seed(1)
    if op == "linear":
        mask = _tile_mask(40, 36, 16, [(0, 0), (1, 2), (2, 1)])
        x, w = torch.randn(9, 36), torch.randn(40, 36)

        def f(x, w, m=mask):
            return masked_linear(x, w, m)

        def ref(x, w):
            return F.linear(x, torch.where(mask, w, 0))
    else:
        mask = torch.rand(20, 6, 3, 3) < 0.5
        x, w = torch.randn(2, 6, 5, 5), torch.randn(20, 6, 3, 3) / 4

        def f(x, w, m=mask):
            return masked_conv2d(x, w, m, None, 1, 1)

        def ref(x, w):
            return F.conv2d(x, torch.where(mask, w, 0), None, 1, 1)

    x, w = x.requires_grad_(), w.requires_grad_()
    with lthfast.backend("triton"):
        got = _penalised_grads(f, x, w)
    expected = _penalised_grads(ref, x.detach().double().requires_grad_(), w.detach().double().requires_grad_())
    for g, e in zip(got, expected):
        scale = e.abs().max()
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4 * scale)
    assert torch.count_nonzero(got[1][~mask]) == 0
