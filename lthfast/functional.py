"""Public functional API: ``masked_linear`` and ``masked_conv2d``."""

from __future__ import annotations

import torch

from lthfast.ops import conv as _conv
from lthfast.ops import linear as _linear


def masked_linear(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Y = X (W ⊙ M)^T + b, differentiable in x, weight and bias; the weight gradient is zero where M is.

    x [..., K]; weight [N, K] (float32/float16/bfloat16); mask [N, K] bool, same device; bias [N] or None.
    Returns [..., N] in x's dtype. Nothing is modified in place. CUDA tensors run the Triton kernels, CPU
    tensors the CPU path (see ``lthfast._backend``). Under ``torch.autocast`` the op computes in the autocast
    dtype (x, weight and bias cast to it; the mask stays bool) and returns that dtype (``lthfast.ops.autocast``).
    """
    return _linear.masked_linear(x, weight, mask, bias)


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
    """``F.conv2d(x, W ⊙ M, bias, stride, padding, dilation, groups)`` with the weight gradient zero where M is.

    x [B, Cin, H, W] (NCHW or channels_last); weight/mask [Cout, Cin/groups, kh, kw]; mask bool. Under
    ``torch.autocast`` it computes in, and returns, the autocast dtype, as ``masked_linear`` does.
    """
    return _conv.masked_conv2d(x, weight, mask, bias, stride, padding, dilation, groups)
