"""Residual networks: ResNet-20/56 for CIFAR (He et al. 2016, 16/32/64 channels) and ResNet-18 (64..512)."""

from __future__ import annotations

import torch
from torch import nn

from lthfast.models.mlp import init_weights_


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual; a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """A stem, stages of BasicBlocks (the first block of each later stage has stride 2), average pool, ``fc``.

    ``widths`` per stage and ``blocks`` per stage: CIFAR ResNet-20 is (16, 32, 64) x 3, ResNet-56 (16, 32, 64)
    x 9, ResNet-18 (64, 128, 256, 512) x 2. Images of 64 pixels or more get the ImageNet stem (7x7 stride 2
    and max-pool); smaller ones a 3x3 stem.
    """

    def __init__(
        self,
        widths: tuple[int, ...],
        blocks: int | tuple[int, ...],
        input_shape: tuple[int, int, int],
        num_classes: int,
    ) -> None:
        super().__init__()
        blocks = (blocks,) * len(widths) if isinstance(blocks, int) else blocks
        if min(input_shape[1:]) >= 64:
            self.conv = nn.Conv2d(input_shape[0], widths[0], 7, 2, 3, bias=False)
            self.stem_pool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv = nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False)
            self.stem_pool = nn.Identity()
        self.bn = nn.BatchNorm2d(widths[0])
        layers, in_channels = [], widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for i in range(count):
                layers.append(BasicBlock(in_channels, width, 2 if stage > 0 and i == 0 else 1))
                in_channels = width
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(self.pool(self.blocks(x)).flatten(1))
