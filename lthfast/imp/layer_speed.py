"""The layer benchmark at a run's own masks: ``lthfast ablate --layer-bench``.

For one level's ``mask.safetensors``, every prunable layer of the model is timed as ``lthfast bench layer --mode
train`` times a layer (forward, dX and dW of one batch, random weights and rotated random inputs of the shapes the
model feeds that layer), once dense and once with lthfast's masked op at that layer's mask, interleaved in rounds,
each provider's outputs checked against the float64 reference first. The speed-up is the summed dense median over
the summed lthfast median: training speed of the prunable layers, without the optimizer, the data or the rest of
the model. Both are measured in the same call, so a machine's load hits both alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lthfast.bench import check
from lthfast.bench.layer import LayerConfig, make_tensors, prepare_provider, time_interleaved
from lthfast.bench.providers import Problem
from lthfast.pruning import Masks, prunable

PROVIDERS = ("dense", "lthfast")


def layer_inputs(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """weight name -> (its nn.Linear / nn.Conv2d module, the input shape it sees) for ``model(example)``."""
    names = set(prunable(model))
    seen: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}
    hooks = []

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, (module, tuple(args[0].shape)))

        return hook

    for module_name, module in model.named_modules():
        name = f"{module_name}.weight" if module_name else "weight"
        if name in names and isinstance(module, (nn.Linear, nn.Conv2d)):
            hooks.append(module.register_forward_pre_hook(record(name)))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def layer_config(module: nn.Module, input_shape: tuple[int, ...], **timing) -> LayerConfig | None:
    """The ``LayerConfig`` of one layer as the model runs it (None for a conv the benchmark cannot describe)."""
    if isinstance(module, nn.Linear):
        tokens = math.prod(input_shape[:-1])
        return LayerConfig(op="linear", shape=tuple(module.weight.shape), tokens=tokens, mode="train", **timing)
    padding, stride, dilation = module.padding, module.stride, module.dilation
    if isinstance(padding, str) or len({*padding}) > 1 or len({*stride}) > 1 or len({*dilation}) > 1:
        return None
    return LayerConfig(
        op="conv", shape=tuple(module.weight.shape), batch=input_shape[0], image=tuple(input_shape[2:]),
        stride=stride[0], padding=padding[0], dilation=dilation[0], groups=module.groups, mode="train", **timing,
    )  # fmt: skip


def time_layer(cfg: LayerConfig, mask: torch.Tensor) -> dict[str, float]:
    """provider -> median ms of one training call of the layer at ``mask`` (a provider that fails is left out)."""
    weight, bias, rotation = make_tensors(cfg)
    mask = mask.to(weight.device)
    conv = cfg.conv_args() if cfg.op == "conv" else {}
    problem = Problem(cfg.op, "train", weight, mask, bias, 1.0 - float(mask.float().mean()), 1, conv, seed=cfg.seed)
    expected = lambda m: check.reference_outputs(cfg.op, True, weight, m, bias, conv, *rotation.sets[0])  # noqa: E731
    calls = {}
    for name in cfg.providers:
        entry, prepared = prepare_provider(name, problem, rotation, expected)
        if prepared is not None and entry["status"] == "ok":
            calls[name] = lambda call=prepared.call: call(*next(rotation))
    timings, _ = time_interleaved(calls, weight.device, cfg)
    return {name: t.median_ms for name, t in timings.items()}


def masks_speedup(
    shapes: dict[str, tuple[nn.Module, tuple[int, ...]]],
    masks: Masks,
    *,
    device: str = "cpu",
    min_run_time: float = 0.05,
    repeats: int = 3,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Dense and lthfast training-call times of every prunable layer at ``masks`` (``layer_inputs``' shapes);
    ``{"dense_ms", "lthfast_ms", "speedup", "layers": {name: {"dense", "lthfast", "density"}}}``. Layers either
    provider could not run are left out of the sums (and named in ``skipped``)."""
    timing = {"device": device, "providers": list(PROVIDERS), "min_run_time": min_run_time, "repeats": repeats,
              "warmup": 2}  # fmt: skip
    layers, skipped = {}, []
    for name, mask in masks.items():
        module, input_shape = shapes.get(name, (None, None))
        cfg = None if module is None else layer_config(module, input_shape, **timing)
        times = {} if cfg is None else time_layer(cfg, mask)
        if set(times) != set(PROVIDERS):
            skipped.append(name)
            continue
        layers[name] = {**times, "density": float(mask.float().mean())}
        if log is not None:
            log(f"  {name}: dense {times['dense']:.3f} ms, lthfast {times['lthfast']:.3f} ms")
    dense = sum(v["dense"] for v in layers.values())
    sparse = sum(v["lthfast"] for v in layers.values())
    speedup = dense / sparse if sparse > 0 else float("nan")
    return {"dense_ms": dense, "lthfast_ms": sparse, "speedup": speedup, "layers": layers, "skipped": skipped}
