"""Masked conv2d op. PLACEHOLDER: reference path only until the Triton kernels land."""

from __future__ import annotations

import torch

from lthfast import reference


def masked_conv2d(x, weight, mask, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    return reference.masked_conv2d(x, weight, mask, bias, stride, padding, dilation, groups)
