"""Small models for the pruning tests: an MLP and a conv net with tie-free weights (distinct magnitudes)."""

import torch
from torch import nn


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16 * 3 * 3, 32), nn.ReLU())
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.out(self.body(x))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))


@torch.no_grad()
def tie_free_(model: nn.Module) -> nn.Module:
    """Give every Linear/Conv2d weight a distinct magnitude (a random permutation of a grid, random signs)."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    total = sum(w.numel() for w in weights)
    values = (torch.randperm(total).double() + 1.0) / total
    values *= torch.where(torch.rand(total) < 0.5, -1.0, 1.0).double()
    start = 0
    for w in weights:
        w.copy_(values[start : start + w.numel()].view_as(w))
        start += w.numel()
    return model


def image_batch(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8)
