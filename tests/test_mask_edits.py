"""Mask edits made outside the layer are seen at the next call: in place through the tensor, ``mask.data = new``
(a storage swap that leaves the version counter alone), and ``mask.data[...]`` writes followed by
``torch.autograd.graph.increment_version``, as nn.py's docstring tells. Every mask-derived cache (tile index,
CPU block plan, "all alive", the integer mask bits, the conv mask copy, mask_optimizer's bool masks) follows."""

from __future__ import annotations

import pytest
import torch

import lthfast
from lthfast import reference
from lthfast.nn import MaskedConv2d, MaskedLinear


def _data_assign(mask: torch.Tensor, new: torch.Tensor) -> None:
    mask.data = new


def _data_write_then_bump(mask: torch.Tensor, new: torch.Tensor) -> None:
    mask.data.copy_(new)
    torch.autograd.graph.increment_version(mask)


EDITS = {"data-assign": _data_assign, "data-write-then-bump": _data_write_then_bump}
LAYERS = {
    "linear-small": lambda: MaskedLinear(40, 36),
    "linear-16k": lambda: MaskedLinear(256, 128),  # >= 16384 weights: the CPU route multiplies cached mask bits
    "conv-small": lambda: MaskedConv2d(6, 8, 3, padding=1),
    "conv-16k": lambda: MaskedConv2d(48, 64, 3, padding=1).to(memory_format=torch.channels_last),
}


def _inputs(layer: torch.nn.Module) -> torch.Tensor:
    if isinstance(layer, MaskedLinear):
        return torch.randn(5, layer.in_features)
    return torch.randn(2, layer.in_channels, 5, 6).to(memory_format=torch.channels_last)


def _expected(layer, x, mask):
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    if isinstance(layer, MaskedLinear):
        return reference.masked_linear(x.double(), w, mask, b)
    return reference.masked_conv2d(x.double(), w, mask, b, padding=1)


# The Triton kernels (interpreter on CPU) on the small layers only: the interpreter is slow, and the caches it reads
# are the same at any size.
CASES = [(w, "torch") for w in LAYERS] + [(w, "triton") for w in LAYERS if w.endswith("small")]


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("which,backend", CASES)
def test_a_mask_edit_outside_the_layer_is_seen(which, backend, edit, request):
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    with lthfast.backend(backend):
        _check_edit_is_seen(which, edit)


def _check_edit_is_seen(which: str, edit: str) -> None:
    torch.manual_seed(0)
    layer = LAYERS[which]()
    x = _inputs(layer)
    layer(x).sum().backward()  # builds and caches everything derived from the full mask
    new = torch.rand(layer.mask.shape) < 0.3
    EDITS[edit](layer.mask, new)
    assert torch.equal(layer.mask, new)
    layer.weight.grad = None
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(y.double(), _expected(layer, x, new), atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(layer.weight.grad[~new]) == 0


def test_mask_optimizer_follows_a_swapped_mask():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6))
    torch.nn.utils.prune.random_unstructured(model[0], "weight", amount=0.5)  # a float weight_mask
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    lthfast.mask_optimizer(opt, model)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()  # caches the bool form of the first mask
    new = (torch.rand(6, 8) < 0.3).float()
    model[0].weight_mask.data = new
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert torch.count_nonzero(model[0].weight_orig.detach()[new == 0]) == 0
