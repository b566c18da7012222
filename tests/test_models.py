"""Models: shapes, parameter counts of the published architectures, and the pruning names."""

import pytest
import torch

from lthfast.models import MODELS, ModelError, build_model


def _count(model, kind=(torch.nn.Linear, torch.nn.Conv2d)):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, kind))


@pytest.mark.parametrize("name", MODELS)
def test_forward_shape_and_backward(name):
    model = build_model(name, (3, 8, 8), 7, hidden=(20,))
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    assert out.shape == (2, 7)
    if name == "vgg19":  # 20.0M parameters in the CIFAR variant (VGG-19 of Frankle & Carbin, table 1)
        assert 19.9e6 < sum(p.numel() for p in model.parameters()) < 20.1e6
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_published_sizes():
    # Prunable weight counts of Frankle & Carbin (2019), table 1, and of the CIFAR ResNet-20 (He et al.).
    assert _count(build_model("lenet", (1, 28, 28), 10)) == 784 * 300 + 300 * 100 + 100 * 10
    assert _count(build_model("conv2", (3, 32, 32), 10)) == 3 * 64 * 9 + 64 * 64 * 9 + 16384 * 256 + 256 * 256 + 2560
    conv6 = build_model("conv6", (3, 32, 32), 10)
    assert _count(conv6, torch.nn.Linear) == 4096 * 256 + 256 * 256 + 2560
    resnet20 = sum(p.numel() for p in build_model("resnet20", (3, 32, 32), 10).parameters())
    assert 0.26e6 < resnet20 < 0.28e6


def test_mlp_names_and_dropout():
    model = build_model("mlp", (40,), 10, hidden=(8, 6), dropout=0.5)
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    assert names == ["fc1.weight", "fc2.weight", "out.weight"]
    x = torch.randn(16, 40)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))  # dropout active


def test_small_images_skip_pooling():
    out = build_model("vgg11", (1, 8, 8), 10)(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 10)


def test_errors_name_the_model():
    with pytest.raises(ModelError, match="unknown model 'alexnet'"):
        build_model("alexnet", (3, 32, 32), 10)
    with pytest.raises(ModelError, match="conv4 needs image input"):
        build_model("conv4", (40,), 10)


@pytest.mark.parametrize("depth", [11, 16, 19])
def test_vgg_ends_in_the_average_pool(depth):
    """Frankle & Carbin's VGG-19: four max-pools, the last block ending in the average pool (no fifth max-pool)."""
    model = build_model(f"vgg{depth}", (3, 32, 32), 10)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 4
    x = torch.randn(2, 3, 32, 32)
    features = model.features(x)
    assert features.shape[2:] == (2, 2)  # averaged by the pool, as AvgPool2d(2)
    torch.testing.assert_close(model(x), model.fc(features.mean(dim=(2, 3))))
