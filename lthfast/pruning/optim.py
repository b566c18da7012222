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

from lthfast.kernels.tile_index import contents_stamp
from lthfast.nn import check_mask
from lthfast.pruning.layers import Layer, all_layers, zero_pruned_


class _Guard:
    """Resolves masks at every step (pruning may replace them); caches torch's float masks as bool per version."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> None:
        self.model = model
        self.masks = dict(masks) if masks is not None else {}
        self._bool: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def _mask_of(self, layer: Layer) -> torch.Tensor | None:
        mask = self.masks.get(layer.name)
        if mask is not None or layer.layout == "plain":
            return mask
        if layer.layout == "masked":
            return layer.module.mask
        mask = layer.module.weight_mask
        cached = self._bool.get(id(layer.param))
        if cached is None or cached[0] is not mask or cached[1] != contents_stamp(mask):
            cached = (mask, contents_stamp(mask), mask != 0)
            self._bool[id(layer.param)] = cached
        return cached[2]

    @torch.no_grad()
    def __call__(self, optimizer: torch.optim.Optimizer, args=None, kwargs=None) -> None:
        # Layers are looked up at every step (~0.3 ms for ResNet-50's 54) so that sparsify / from_torch_prune
        # after registration are followed.
        for layer in all_layers(self.model):
            mask = self._mask_of(layer)
            if mask is None:
                continue
            param = layer.param
            zero_pruned_(param, mask)
            for value in (optimizer.state.get(param) or {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.is_floating_point():
                    zero_pruned_(value, mask)


def mask_optimizer(
    optimizer: torch.optim.Optimizer, model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None
) -> RemovableHandle:
    """Register a post-step hook on ``optimizer`` that keeps ``model``'s pruned weights and their state at zero.

    Masks come from the model's masked modules and torch-pruned modules, read at every step (so later
    prunes are followed); ``masks`` (name -> bool tensor, e.g. ``Masks``) adds or overrides masks, which
    is how plain, unconverted modules are guarded. Only the model's prunable weights are touched. Cost per
    step: one in-place integer multiply per guarded weight and per state tensor (``zero_pruned_``). Returns
    the hook handle (``.remove()``).
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
