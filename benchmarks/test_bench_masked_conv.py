"""pytest-benchmark cases for masked conv2d: a few ResNet-18 (CIFAR) shapes, providers side by side.

    .venv/bin/python -m pytest benchmarks/test_bench_masked_conv.py --benchmark-enable --benchmark-group-by=param:case

pyproject's addopts pass --benchmark-disable, so without --benchmark-enable every case runs once, as a plain
test (its output is still checked against the float64 reference). The full sweep, with JSON and ratio tables,
is benchmarks/bench_masked_conv.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from bench_masked_conv import NETS, check, make_mask, provider_fn, reference_step, step_fn

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
BATCH = 128 if CUDA else 2
LAYERS = {layer[0]: layer for layer in NETS["resnet18-cifar"] if layer[0] in ("layer1", "layer3", "layer4.down")}
CASES = [(0.0, "unstructured"), (0.9, "tile-block"), (0.98, "tile-block"), (0.9, "channel-block-16")]
PROVIDERS = ["dense", "mask-multiply", "lthfast"] + (["lthfast-triton"] if CUDA else [])


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("case", [f"{s}-{lay}" for s, lay in CASES])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_masked_conv(benchmark, layer, case, mode, provider):
    _, cin, cout, k, stride, pad, hw = LAYERS[layer]
    sparsity, layout = float(case.split("-", 1)[0]), case.split("-", 1)[1]
    gen = torch.Generator().manual_seed(0)
    conv = {"stride": stride, "padding": pad}
    w = (torch.randn(cout, cin, k, k, generator=gen) / math.sqrt(cin * k * k)).to(DEVICE, DTYPE).requires_grad_()
    b = torch.randn(cout, generator=gen).to(DEVICE, DTYPE).requires_grad_()
    m = make_mask(layout, sparsity, w.shape, DEVICE, gen)
    x = torch.randn(BATCH, cin, hw, hw, generator=gen).to(DEVICE, DTYPE).requires_grad_()
    fn, params = provider_fn(provider, w, m, b, conv)
    step = step_fn(fn, params, mode)
    y_shape = F.conv2d(x[:1].detach(), w.detach(), None, **conv).shape[1:]
    g = torch.randn(BATCH, *y_shape, generator=gen).to(DEVICE, DTYPE)
    out = list(step(x, g))
    if provider == "dense" and mode == "train":  # dense training computes dW everywhere; compare where alive
        out[2] = torch.where(m, out[2], 0)
    check(out, reference_step(x, g, w, m, b, conv, mode), DTYPE, f"{layer} {case} {mode} {provider}")
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE), batch=BATCH, density=m.float().mean().item())
    benchmark(lambda: (step(x, g), _sync()))
