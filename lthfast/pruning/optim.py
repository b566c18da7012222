"""``mask_optimizer``: keep pruned weights exactly zero through any optimizer step.

Masked kernels already give pruned weights a zero gradient, but an optimizer can still move them: weight
decay is applied to the stored weight, and momentum / Adam moments accumulated before a prune keep pushing.
The guard is an optimizer post-step hook that zeroes the pruned stored weights and every per-parameter state
tensor shaped like the weight (SGD ``momentum_buffer``; Adam/AdamW ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``; any other optimizer's equivalents), so the next step starts clean.

Once it has zeroed a weight and its state for the mask's current contents, the zeroing is skipped where it cannot
change anything: torch's SGD, Adam and AdamW (any flags) keep a pruned entry exactly zero when the weight, its state
and its gradient are zero there. A pre-step hook checks that nothing has written the weight, its state or the mask
since the guard last ran and that the gradient is zero at every pruned entry (one read-only lthfast._C pass over the
gradients, about a fifth of the memory traffic of the zeroing); any other optimizer class, a failed check, a CUDA
or non-contiguous tensor, or a missing lthfast._C gets the full zeroing.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lthfast import _backend
from lthfast.nn import check_mask
from lthfast.pruning.fused_optim import MaskedAdam, MaskedAdamW, MaskedSGD, _FusedMasked, stamp
from lthfast.pruning.layers import Layer, all_layers, zero_pruned_

# Optimizers whose step keeps zero weights with zero state and gradient at zero (checked by type, not isinstance:
# a subclass may step otherwise).
_ZERO_PRESERVING = {torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, MaskedSGD, MaskedAdam, MaskedAdamW}


def _weight_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> list[torch.Tensor]:
    return [
        v
        for v in (optimizer.state.get(param) or {}).values()
        if isinstance(v, torch.Tensor) and v.shape == param.shape and v.is_floating_point()
    ]


def _stamp(param: torch.Tensor, mask: torch.Tensor, state: list[torch.Tensor]) -> tuple:
    """What must not change between the guard's zeroing and the next step for the skip to hold (the record keeps
    ``mask`` and ``state`` alive, so their ids are not reused)."""
    return (id(mask), stamp(mask), stamp(param), [(id(t), stamp(t)) for t in state])


class _Guard:
    """Resolves masks at every step (pruning may replace them); caches torch's float masks as bool per version.

    ``_zeroed[id(param)]``: (``_stamp`` right after the guard last ran, and what it names: param, mask, state);
    ``_clean``: the ids of the parameters the pre-step hook found unchanged since and with a zero gradient at every
    pruned entry; ``_pending``: the (param, mask) pairs it looked up, which the post-step hook reuses.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> None:
        self.model = model
        self.masks = dict(masks) if masks is not None else {}
        self._bool: dict[int, tuple[torch.Tensor, tuple, torch.Tensor]] = {}
        self._zeroed: dict[int, tuple] = {}
        self._clean: set[int] = set()
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.skipped = 0  # weights whose zeroing a step skipped (for tests and profiling)

    def _mask_of(self, layer: Layer) -> torch.Tensor | None:
        mask = self.masks.get(layer.name)
        if mask is not None or layer.layout == "plain":
            return mask
        if layer.layout == "masked":
            return layer.module.mask
        mask = layer.module.weight_mask
        cached = self._bool.get(id(layer.param))
        if cached is None or cached[0] is not mask or cached[1] != stamp(mask):
            cached = (mask, stamp(mask), mask != 0)
            self._bool[id(layer.param)] = cached
        return cached[2]

    def _guarded(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Layers are looked up at every step (~0.3 ms for ResNet-50's 54) so that sparsify / from_torch_prune
        # after registration are followed.
        out = []
        for layer in all_layers(self.model):
            mask = self._mask_of(layer)
            if mask is not None:
                out.append((layer.param, mask))
        return out

    @torch.no_grad()
    def before_step(self, optimizer: torch.optim.Optimizer, args=None, kwargs=None) -> None:
        self._clean.clear()
        self._pending = None
        ext = _backend.ext()
        if type(optimizer) not in _ZERO_PRESERVING or ext is None or not hasattr(ext, "pruned_grads_zero"):
            return
        if isinstance(optimizer, _FusedMasked):  # never reads pruned gradients: ``guards`` decides after the step
            return
        todo = []
        self._pending = self._guarded()
        for param, mask in self._pending:
            rec = self._zeroed.get(id(param))
            if rec is None or rec[0] != _stamp(param, mask, _weight_state(optimizer, param)):
                continue
            grad = param.grad
            if grad is None:
                self._clean.add(id(param))  # not stepped
            elif grad.is_cpu and grad.layout is torch.strided and grad.is_contiguous() and mask.is_contiguous():
                todo.append((param, grad, mask))
        if todo:
            zero = ext.pruned_grads_zero(
                [g.data_ptr() for _, g, _ in todo],
                [m.data_ptr() for _, _, m in todo],
                [g.numel() for _, g, _ in todo],
                [g.element_size() for _, g, _ in todo],
                torch.get_num_threads(),
            )
            self._clean.update(id(p) for (p, _, _), ok in zip(todo, zero) if ok)

    @torch.no_grad()
    def __call__(self, optimizer: torch.optim.Optimizer, args=None, kwargs=None) -> None:
        fused = optimizer if isinstance(optimizer, _FusedMasked) else None
        for param, mask in self._pending if self._pending is not None else self._guarded():
            if id(param) in self._clean or (fused is not None and fused.guards(param, mask)):
                self.skipped += 1
            else:
                zero_pruned_(param, mask)
                for value in _weight_state(optimizer, param):
                    zero_pruned_(value, mask)
            state = _weight_state(optimizer, param)
            self._zeroed[id(param)] = (_stamp(param, mask, state), param, mask, state)
        self._clean.clear()
        self._pending = None


def _check_holds_masked(optimizer: torch.optim.Optimizer, model: nn.Module, masks: Mapping | None) -> None:
    """Raise when ``optimizer`` holds none of the weights the guard would keep at zero (a mix-up of models)."""
    layers = all_layers(model)
    masked = [layer for layer in layers if layer.layout != "plain" or layer.name in (masks or {})]
    candidates = masked or layers
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if candidates and not any(id(layer.param) in held for layer in candidates):
        what = "masked weights" if masked else "nn.Linear/nn.Conv2d weights"
        raise ValueError(
            f"mask_optimizer: the optimizer holds none of the model's {what} "
            f"({', '.join(layer.name for layer in candidates)}): was it built for another model?"
        )


def mask_optimizer(
    optimizer: torch.optim.Optimizer, model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None
) -> RemovableHandle:
    """Register step hooks on ``optimizer`` that keep ``model``'s pruned weights and their state at zero.

    Masks come from the model's masked modules and torch-pruned modules, read at every step (so later
    prunes are followed); ``masks`` (name -> bool tensor, e.g. ``Masks``) adds or overrides masks, which
    is how plain, unconverted modules are guarded. Only the model's prunable weights are touched. Cost per
    step: for torch's SGD / Adam / AdamW (and lthfast's fused masked ones), a read of each gradient where pruned
    while nothing else writes the weights; otherwise one in-place integer multiply per guarded weight and per state
    tensor (``zero_pruned_``). Raises ValueError when the optimizer holds none of the model's masked weights (or,
    before any is masked, none of its prunable weights). Returns the hook handle (``.remove()`` removes both hooks).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"mask_optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    by_name = {layer.name: layer for layer in all_layers(model)}
    for name, mask in (masks or {}).items():
        layer = by_name.get(name)
        if layer is None:
            raise KeyError(f"mask_optimizer: mask {name!r} names no nn.Linear/nn.Conv2d weight of the model")
        check_mask(mask, layer.param, name)
    _check_holds_masked(optimizer, model, masks)
    guard = _Guard(model, masks)
    handle = RemovableHandle(optimizer._optimizer_step_post_hooks, extra_dict=optimizer._optimizer_step_pre_hooks)
    optimizer._optimizer_step_post_hooks[handle.id] = guard
    optimizer._optimizer_step_pre_hooks[handle.id] = guard.before_step
    return handle
