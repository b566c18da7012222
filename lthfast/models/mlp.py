"""Fully-connected networks: LeNet-300-100 and any MLP (``fc1 .. fcN`` hidden layers, ``out`` classifier)."""

from __future__ import annotations

import math

import torch
from torch import nn


def init_weights_(model: nn.Module) -> nn.Module:
    """Kaiming-normal weights (fan-in, ReLU) and zero biases for every Linear / Conv2d, in place (as open_lth)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


class MLP(nn.Module):
    """x [B, *input_shape] -> flatten -> (Linear, ReLU, Dropout) per hidden width -> Linear -> logits [B, classes]."""

    def __init__(
        self, input_shape: tuple[int, ...], hidden: tuple[int, ...], num_classes: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        width = math.prod(input_shape)
        self.hidden_names = []
        for i, out in enumerate(hidden, start=1):
            setattr(self, f"fc{i}", nn.Linear(width, out))
            self.hidden_names.append(f"fc{i}")
            width = out
        self.out = nn.Linear(width, num_classes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        init_weights_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for name in self.hidden_names:
            x = self.dropout(torch.relu(getattr(self, name)(x)))
        return self.out(x)
