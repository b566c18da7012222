"""Masked linear op. PLACEHOLDER: reference path only until the Triton kernels land."""

from __future__ import annotations

import torch

from lthfast import reference


def masked_linear(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return reference.masked_linear(x, weight, mask, bias)
