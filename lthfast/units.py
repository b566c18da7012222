"""Independent trainings of one architecture ("units": a level's replicates, its control branches) run as one model.

``stack(models)`` builds a model whose layers hold the U units' weights, masks and BatchNorm statistics side by side:
each Linear / MaskedLinear becomes a ``StackedLinear`` (weights [U, out, in], one batched GEMM for the U products),
each Conv2d / MaskedConv2d a ``StackedConv2d`` (weights [U, Cout, Cin / groups, kh, kw], one grouped convolution over
U x groups), each BatchNorm2d a ``StackedBatchNorm2d`` (U x C channels: per-unit statistics). Activations travel with
the units side by side: image features as [B, U * C, H, W] (unit u's channels at u * C ... u * C + C - 1), flat
features as [B, U * F] or [U, B, F]. The models' own ``forward`` then runs unchanged, so every model of
``lthfast.models`` stacks; a module the stacking does not know (one with parameters or buffers of its own) is refused
with the reason.

    stacked = units.stack(models)                    # U models, same architecture, masks applied
    opt = lthfast.MaskedSGD(stacked.parameters(), masks=units.masks(stacked), lr=0.1, momentum=0.9)
    logits = stacked(units.stack_input(xs))          # xs [U, B, *input] (each unit its own batch) -> [U, B, classes]
    units.cross_entropy(logits, ys).backward()       # sum over units of each unit's mean loss
    opt.step()
    units.unit_state_dict(stacked, 2)                # unit 2 as a state_dict of the original model
    units.split(stacked, "fc1.weight", state)        # a tensor laid out as fc1.weight (e.g. Adam's exp_avg), per unit

Each unit's arithmetic is its own training's: the per-unit loss gives each unit's weights its own gradient, and the
optimizers are elementwise, so a stacked step equals U separate steps up to the float summation order of the batched
products (``tests/test_units.py`` states the tolerance). Masked products take W ⊙ M exactly (no NaN from a pruned
weight leaks); the CPU sparse routes of single layers are not used by stacked layers. Dropout draws one mask for all
units from torch's RNG, so a stacked run with dropout is not the sequential run's draw for draw.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lthfast.ops.masking import masked


class StackError(ValueError):
    """The models cannot be stacked; the message names the module and why."""


def _mask_of(layer: nn.Module) -> torch.Tensor | None:
    mask = layer._buffers.get("mask")
    return None if mask is None else mask.detach()


def _stacked_param(tensors: list[torch.Tensor | None]) -> nn.Parameter | None:
    if tensors[0] is None:
        return None
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).clone())


class _StackedMasked(nn.Module):
    """What the stacked weight layers share: U units' weights [U, ...], their bool masks (or none) and biases."""

    units: int

    def _init_stack(self, layers: Sequence[nn.Module]) -> None:
        self.units = len(layers)
        self.weight = _stacked_param([m.weight for m in layers])
        self.bias = _stacked_param([m.bias for m in layers])
        masks = [_mask_of(m) for m in layers]  # all or none: the models' state_dict keys are checked equal
        if masks[0] is not None:
            self.register_buffer("mask", torch.stack(masks).clone())
        else:
            self.mask = None

    def effective_weight(self) -> torch.Tensor:
        """W ⊙ M of every unit (exact zeros where pruned), differentiable in W."""
        return self.weight if self.mask is None else masked(self.weight, self.mask)


class StackedLinear(_StackedMasked):
    """U Linear / MaskedLinear layers as one: x [U, B, in] or [B, U * in] -> [U, B, out] by one batched GEMM."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.in_features, self.out_features = layers[0].in_features, layers[0].out_features
        self._init_stack(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.units
        if x.dim() == 2:  # flat features side by side, as flatten(1) leaves a stacked image batch
            x = x.reshape(x.shape[0], u, self.in_features).transpose(0, 1)
        elif x.dim() != 3 or x.shape[0] != u:
            raise ValueError(
                f"StackedLinear({u} units): input must be [B, {u} * in] or [{u}, B, in], got {tuple(x.shape)}"
            )
        w = self.effective_weight().transpose(1, 2)
        if self.bias is None:
            return torch.bmm(x, w)
        return torch.baddbmm(self.bias.unsqueeze(1), x, w)

    def extra_repr(self) -> str:
        return f"units={self.units}, in_features={self.in_features}, out_features={self.out_features}"


class StackedConv2d(_StackedMasked):
    """U Conv2d / MaskedConv2d layers as one grouped convolution: x [B, U * Cin, H, W] -> [B, U * Cout, OH, OW]."""

    def __init__(self, layers: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        first = layers[0]
        self.in_channels, self.out_channels = first.in_channels, first.out_channels
        self.stride, self.padding, self.dilation, self.groups = (
            first.stride,
            first.padding,
            first.dilation,
            first.groups,
        )
        self._init_stack(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight().flatten(0, 1)
        bias = None if self.bias is None else self.bias.flatten()
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups * self.units)

    def extra_repr(self) -> str:
        return (
            f"units={self.units}, {self.in_channels}, {self.out_channels}, stride={self.stride}, padding={self.padding}"
        )


class StackedBatchNorm2d(nn.BatchNorm2d):
    """U BatchNorm2d layers as one over U * C channels: each unit's statistics are its own channels'."""

    def __init__(self, layers: Sequence[nn.BatchNorm2d]) -> None:
        first = layers[0]
        super().__init__(
            first.num_features * len(layers), first.eps, first.momentum, first.affine, first.track_running_stats,
            device=first.weight.device, dtype=first.weight.dtype,
        )  # fmt: skip
        self.units, self.unit_features = len(layers), first.num_features
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(first, name) is not None:
                    getattr(self, name).copy_(torch.cat([getattr(m, name) for m in layers]))
            if first.num_batches_tracked is not None:
                self.num_batches_tracked.copy_(first.num_batches_tracked)


def _check(models: Sequence[nn.Module]) -> None:
    if len(models) < 1:
        raise StackError("stack: no models")
    shapes = [{k: (tuple(v.shape), v.dtype, v.device) for k, v in m.state_dict().items()} for m in models]
    for i, s in enumerate(shapes[1:], start=1):
        if s != shapes[0] or type(models[i]) is not type(models[0]):
            raise StackError(f"stack: model {i} is not model 0's architecture (its state_dict keys or shapes differ)")
    for name, module in models[0].named_modules():
        where = name or type(models[0]).__name__
        if "weight_orig" in module._parameters:
            raise StackError(f"stack: {where} is pruned by torch.nn.utils.prune: convert it (lthfast.from_torch_prune)")
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise StackError(f"stack: {where} pads with {module.padding_mode!r}; only zero padding stacks")
        known = isinstance(module, (nn.Linear, nn.Conv2d, nn.BatchNorm2d))
        own = list(module._parameters) + [k for k, v in module._buffers.items() if v is not None]
        if own and not known:
            raise StackError(f"stack: {where} ({type(module).__name__}) holds {', '.join(own)}; it cannot be stacked")
        if isinstance(module, nn.BatchNorm2d) and (not module.affine or not module.track_running_stats):
            raise StackError(f"stack: {where} is a BatchNorm2d without affine parameters or running statistics")


def stack(models: Sequence[nn.Module]) -> nn.Module:
    """One model computing ``models`` (same architecture; masks applied) side by side; see the module docstring.
    Raises StackError naming the first module that cannot be stacked. The models themselves are not changed."""
    models = list(models)
    _check(models)
    out = copy.deepcopy(models[0])
    for name, module in list(models[0].named_modules()):
        group = [m.get_submodule(name) for m in models] if name else models
        if isinstance(module, nn.Linear):
            new = StackedLinear(group)
        elif isinstance(module, nn.Conv2d):
            new = StackedConv2d(group)
        elif isinstance(module, nn.BatchNorm2d):
            new = StackedBatchNorm2d(group)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, new)
    out.train(models[0].training)
    return out


def units_of(stacked: nn.Module) -> int:
    """The number of units of a stacked model."""
    for module in stacked.modules():
        if isinstance(module, (_StackedMasked, StackedBatchNorm2d)):
            return module.units
    raise StackError("units_of: not a stacked model (no stacked layer in it)")


def stack_input(xs: torch.Tensor) -> torch.Tensor:
    """Each unit's batch, xs [U, B, *input], as the stacked model's input: images [B, U * C, H, W] (units side by
    side in the channels), anything else [B, U * F] (flat features side by side)."""
    u, b = xs.shape[:2]
    if xs.dim() == 5:
        return xs.transpose(0, 1).reshape(b, u * xs.shape[2], *xs.shape[3:])
    return xs.reshape(u, b, -1).transpose(0, 1).reshape(b, -1)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over units of each unit's mean cross-entropy: logits [U, B, classes], y [U, B]. Its gradient with respect
    to unit u's weights is that of unit u's own loss."""
    u, b = y.shape
    losses = F.cross_entropy(logits.reshape(u * b, -1), y.reshape(-1), reduction="none")
    return losses.view(u, b).mean(1).sum()


def masks(stacked: nn.Module) -> dict[torch.Tensor, torch.Tensor]:
    """{stacked weight: its stacked mask} of every masked stacked layer: ``masks=`` of the fused masked optimizers."""
    return {m.weight: m.mask for m in stacked.modules() if isinstance(m, _StackedMasked) and m.mask is not None}


def split(stacked: nn.Module, name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
    """``tensor``, laid out as the stacked model's parameter or buffer ``name`` (the tensor itself, or optimizer
    state shaped like it), as each unit's part: views, one per unit. A tensor the units share (``num_batches_tracked``,
    the buffers of a module that is not stacked) is every unit's."""
    module_name, _, key = name.rpartition(".")
    module = stacked.get_submodule(module_name)
    if isinstance(module, _StackedMasked):
        return list(tensor.unbind(0))
    if isinstance(module, StackedBatchNorm2d) and key != "num_batches_tracked":
        return list(tensor.split(module.unit_features))
    return [tensor] * units_of(stacked)


def join(stacked: nn.Module, name: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The inverse of ``split``: the units' parts of ``name`` as one tensor laid out as the stacked model's (a new
    tensor; a shared tensor is unit 0's)."""
    module_name, _, key = name.rpartition(".")
    module = stacked.get_submodule(module_name)
    if isinstance(module, _StackedMasked):
        return torch.stack(list(tensors))
    if isinstance(module, StackedBatchNorm2d) and key != "num_batches_tracked":
        return torch.cat(list(tensors))
    return tensors[0].clone()


def unit_state_dict(stacked: nn.Module, u: int) -> dict[str, torch.Tensor]:
    """Unit ``u`` of a stacked model as a state_dict of the models it was stacked from (copies)."""
    count = units_of(stacked)
    if not 0 <= u < count:
        raise IndexError(f"unit_state_dict: unit {u} of a stack of {count}")
    return {name: split(stacked, name, t)[u].clone() for name, t in stacked.state_dict().items()}
