"""The networks ``lthfast bench train`` times, from ``lthfast.models``: LeNet-300-100 on MNIST shapes, the MNIST-1D MLP
(40-256-256-10), ResNet-20 and VGG-16 on CIFAR-10 shapes."""

from __future__ import annotations

from torch import nn

# bench name -> (lthfast.models.build_model name, input shape without the batch, classes, its keyword arguments)
MODELS = {
    "lenet300": ("lenet", (1, 28, 28), 10, {}),
    "mlp-mnist1d": ("mlp", (40,), 10, {"hidden": (256, 256)}),  # the demo's and the claims runs' MLP
    "resnet20": ("resnet20", (3, 32, 32), 10, {}),
    "vgg16": ("vgg16", (3, 32, 32), 10, {}),
}


def build(name: str) -> tuple[nn.Module, tuple[int, ...], int, str]:
    """(model, input shape without the batch, classes, source) for ``name``; float32 on the CPU, freshly initialized
    from torch's global RNG. ``source`` names the definition used (stored in the JSON)."""
    from lthfast.models import build_model

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {sorted(MODELS)}")
    project_name, input_shape, classes, kwargs = MODELS[name]
    model = build_model(project_name, input_shape, classes, **kwargs)
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return model, input_shape, classes, f"lthfast.models.build_model({project_name!r}{extra})"
