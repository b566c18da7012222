"""Pure-PyTorch versions of every lthfast op: the CPU fallback and the test oracle.

Masks are bool tensors shaped like their weights; a pruned weight contributes exactly zero (``torch.where``,
so even a NaN stored under a pruned entry cannot leak), and its gradient is exactly zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W ⊙ M, same shape and dtype as ``weight``."""
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def masked_linear(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Y = X (W ⊙ M)^T + b. x [..., K], weight/mask [N, K], bias [N] -> [..., N]."""
    return F.linear(x, masked_weight(weight, mask), bias)


def masked_linear_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, has_bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dX, dW, db) of ``masked_linear``: dX = dY (W ⊙ M), dW = (dY^T X) ⊙ M, db = sum of dY."""
    grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
    x_2d = x.reshape(-1, x.shape[-1])
    grad_x = (grad_2d @ masked_weight(weight, mask)).reshape(x.shape)
    grad_w = masked_weight(grad_2d.t() @ x_2d, mask)
    grad_b = grad_2d.sum(0) if has_bias else None
    return grad_x, grad_w, grad_b


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d`` with weight W ⊙ M. x [B, Cin, H, W], weight/mask [Cout, Cin/groups, kh, kw]."""
    return F.conv2d(x, masked_weight(weight, mask), bias, stride, padding, dilation, groups)
