"""Model zoo of the lottery-ticket literature, written here (no torchvision): ``build_model(name, ...)``."""

from __future__ import annotations

from torch import nn

from lthfast.models.conv import VGG, ConvNet
from lthfast.models.mlp import MLP, init_weights_
from lthfast.models.resnet import ResNet

MODELS = ("mlp", "lenet", "conv2", "conv4", "conv6", "vgg11", "vgg16", "vgg19", "resnet20", "resnet56", "resnet18")
IMAGE_MODELS = MODELS[2:]


class ModelError(ValueError):
    """A model cannot be built (unknown name, input shape it cannot take); the message names it."""


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden: tuple[int, ...] = (300, 100),
    dropout: float = 0.0,
) -> nn.Module:
    """A freshly initialized model (uses torch's global RNG: seed it first). Parameters float32 on the CPU.

    mlp: hidden widths ``hidden``; lenet: LeNet-300-100; conv*/vgg*/resnet*: images [C, H, W]. ``dropout`` applies
    to the fully-connected hidden layers (mlp, lenet, conv*) and before VGG's classifier.
    """
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")
    if name in IMAGE_MODELS and len(input_shape) != 3:
        raise ModelError(f"model {name} needs image input [C, H, W]; the data has input shape {tuple(input_shape)}")
    if name == "mlp":
        return MLP(input_shape, tuple(hidden), num_classes, dropout)
    if name == "lenet":
        return MLP(input_shape, (300, 100), num_classes, dropout)
    if name.startswith("conv"):
        return ConvNet(int(name[4:]), input_shape, num_classes, dropout)
    if name.startswith("vgg"):
        return VGG(int(name[3:]), input_shape, num_classes, dropout)
    if name == "resnet18":  # ImageNet widths (11.2M weights); Frankle & Carbin's "Resnet-18" is resnet20 here
        return ResNet((64, 128, 256, 512), 2, input_shape, num_classes)
    return ResNet((16, 32, 64), (int(name[6:]) - 2) // 6, input_shape, num_classes)


__all__ = ["IMAGE_MODELS", "MLP", "MODELS", "VGG", "ConvNet", "ModelError", "ResNet", "build_model", "init_weights_"]
