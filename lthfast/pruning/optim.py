"""``mask_optimizer``: keep pruned weights exactly zero through any optimizer step.

Masked kernels already give pruned weights a zero gradient, but an optimizer can still move them: weight
decay is applied to the stored weight, and momentum / Adam moments accumulated before a prune keep pushing.
The guard is an optimizer post-step hook that, after every step, zeroes the pruned stored weights and every
per-parameter state tensor shaped like the weight (SGD ``momentum_buffer``; Adam/AdamW ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``; any other optimizer's equivalents), so the next step starts clean.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lthfast.nn import check_mask
from lthfast.pruning.layers import Layer, all_layers


class _Guard:
    """Resolves masks at every step (masks are replaced by pruning) and caches their complement per version."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> None:
        self.model = model
        self.masks = dict(masks) if masks is not None else {}
        self._pruned: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def _pruned_of(self, layer: Layer) -> torch.Tensor | None:
        mask = self.masks.get(layer.name)
        if mask is None:
            if layer.layout == "masked":
                mask = layer.module.mask
            elif layer.layout == "torch":
                mask = layer.module.weight_mask
            else:
                return None
        cached = self._pruned.get(id(layer.param))
        if cached is not None and cached[0] is mask and cached[1] == mask._version:
            return cached[2]
        pruned = mask == 0 if mask.dtype != torch.bool else ~mask
        self._pruned[id(layer.param)] = (mask, mask._version, pruned)
        return pruned

    @torch.no_grad()
    def __call__(self, optimizer: torch.optim.Optimizer, args=None, kwargs=None) -> None:
        # Layers are looked up at every step (~0.1 ms for 50 layers) so that sparsify / from_torch_prune after
        # registration are followed.
        for layer in all_layers(self.model):
            pruned = self._pruned_of(layer)
            if pruned is None:
                continue
            param = layer.param
            param.masked_fill_(pruned, 0)
            state = optimizer.state.get(param)
            if not state:
                continue
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.is_floating_point():
                    value.masked_fill_(pruned, 0)


def mask_optimizer(
    optimizer: torch.optim.Optimizer, model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None
) -> RemovableHandle:
    """Register a post-step hook on ``optimizer`` that keeps ``model``'s pruned weights and their state at zero.

    Masks come from the model's masked modules and torch-pruned modules, read at every step (so later
    prunes are followed); ``masks`` (name -> bool tensor, e.g. ``Masks``) adds or overrides masks, which
    is how plain, unconverted modules are guarded. Only the model's prunable weights are touched. Cost: one
    ``masked_fill_`` per guarded weight and state tensor per step. Returns the hook handle (``.remove()``).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"mask_optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    by_name = {layer.name: layer for layer in all_layers(model)}
    for name, mask in (masks or {}).items():
        layer = by_name.get(name)
        if layer is None:
            raise KeyError(f"mask_optimizer: mask {name!r} names no nn.Linear/nn.Conv2d weight of the model")
        check_mask(mask, layer.param, name)
    guard = _Guard(model, masks)
    return optimizer.register_step_post_hook(guard)
