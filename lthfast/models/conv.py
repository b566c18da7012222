"""Convolutional networks for small images: Conv-2/4/6 (Frankle & Carbin 2019) and VGG-11/16/19 (CIFAR variant)."""

from __future__ import annotations

import torch
from torch import nn

from lthfast.models.mlp import init_weights_

CONV_CFG = {
    2: [64, 64, "M"],
    4: [64, 64, "M", 128, 128, "M"],
    6: [64, 64, "M", 128, 128, "M", 256, 256, "M"],
}
# The last block ends in the average pool, not a fifth max-pool: Frankle & Carbin's VGG-19 is "... 4x512, pool,
# 4x512, avg-pool, 10" (their figure 2), as open_lth builds it (32x32 input: a 2x2 average).
VGG_CFG = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


def _features(cfg: list, in_channels: int, size: tuple[int, int], batch_norm: bool) -> tuple[nn.Sequential, int, int]:
    """3x3 conv (padding 1) + [BN] + ReLU per int, 2x2 max-pool per "M" (skipped once the image is 1 pixel)."""
    layers: list[nn.Module] = []
    h, w = size
    for item in cfg:
        if item == "M":
            if h >= 2 and w >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            continue
        layers.append(nn.Conv2d(in_channels, item, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(item))
        layers.append(nn.ReLU(inplace=True))
        in_channels = item
    return nn.Sequential(*layers), in_channels, h * w


class ConvNet(nn.Module):
    """Conv-2/4/6: conv pairs with max-pooling, then FC 256 -> 256 -> classes (dropout on the FC layers)."""

    def __init__(self, depth: int, input_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.features, channels, pixels = _features(CONV_CFG[depth], input_shape[0], input_shape[1:], False)
        self.fc1 = nn.Linear(channels * pixels, 256)
        self.fc2 = nn.Linear(256, 256)
        self.out = nn.Linear(256, num_classes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        init_weights_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        x = self.dropout(torch.relu(self.fc1(x)))
        x = self.dropout(torch.relu(self.fc2(x)))
        return self.out(x)


class VGG(nn.Module):
    """VGG-11/16/19 for CIFAR: conv + BN + ReLU stacks, global average pooling, one linear classifier ``fc``."""

    def __init__(self, depth: int, input_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.features, channels, _ = _features(VGG_CFG[depth], input_shape[0], input_shape[1:], True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)
        init_weights_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(self.features(x)).flatten(1)))
