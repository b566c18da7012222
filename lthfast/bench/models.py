"""The networks ``lthfast bench train`` times: LeNet-300-100 (MNIST shapes), ResNet-20 and VGG-16 (CIFAR shapes).

``lthfast.models.build_model`` is used when it imports; these local definitions (the standard lottery-ticket
architectures, as in Frankle & Carbin 2019 / open_lth) stand in until it does, so that the benchmark does not
depend on the IMP package. Each entry: (constructor, input shape without the batch, number of classes).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def lenet300(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, num_classes)
    )


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.shortcut(x)).relu()


def resnet20(num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-20: 3 stages of 3 basic blocks, 16/32/64 channels, 1x1 projection shortcuts."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for stage, width in enumerate((16, 32, 64)):
        for i in range(3):
            layers.append(_Block(cin, width, 2 if stage > 0 and i == 0 else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def vgg16(num_classes: int = 10) -> nn.Module:
    """CIFAR VGG-16 with batch norm (open_lth's): 13 conv layers, global pooling, one linear classifier."""
    plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    layers: list[nn.Module] = []
    cin = 3
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(cin, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
        cin = item
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


LOCAL: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...], int]] = {
    "lenet300": (lenet300, (1, 28, 28), 10),
    "resnet20": (resnet20, (3, 32, 32), 10),
    "vgg16": (vgg16, (3, 32, 32), 10),
}


# bench name -> lthfast.models.build_model name
PROJECT_NAMES = {"lenet300": "lenet", "resnet20": "resnet20", "vgg16": "vgg16"}


def build(name: str) -> tuple[nn.Module, tuple[int, ...], int, str]:
    """(model, input shape without batch, classes, source) for ``name``; source says which definition was used."""
    if name not in LOCAL:
        raise ValueError(f"unknown model {name!r}: expected one of {sorted(LOCAL)}")
    ctor, input_shape, classes = LOCAL[name]
    try:
        from lthfast.models import build_model
    except ImportError:
        return ctor(classes), input_shape, classes, f"lthfast.bench.models.{name}"
    model = build_model(PROJECT_NAMES[name], input_shape, classes)
    return model, input_shape, classes, f"lthfast.models.build_model({PROJECT_NAMES[name]!r})"
