"""MaskedLinear and MaskedConv2d: nn.Linear / nn.Conv2d whose weight is used as W ⊙ M.

The mask is a persistent bool buffer named ``mask`` (state_dict keys ``weight``, ``bias``, ``mask``).
Kernels cache their tile index (and other mask-derived data) on the mask tensor keyed by its version counter and
storage, so any in-place change of the mask (``set_mask_``, ``mask[...] = False``, ``mask.copy_``,
``load_state_dict``, ``mask.data = new``) is seen at the next forward. Writes that bypass autograd's version
counter, through ``mask.data[...]`` or a NumPy view of the mask, cannot be seen without reading the whole mask at
every call: follow them with ``torch.autograd.graph.increment_version(mask)``.
"""

from __future__ import annotations

import torch
from torch import nn

from lthfast.ops import conv as _conv_op
from lthfast.ops import linear as _linear_op
from lthfast.reference import masked_weight


def check_mask(mask: torch.Tensor, weight: torch.Tensor, where: str) -> torch.Tensor:
    """Validate a mask against its weight; raise naming ``where``. Returns the mask (bool)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}: mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{where}: mask must be bool, got {mask.dtype}")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"{where}: mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"{where}: mask is on {mask.device} but the weight is on {weight.device}")
    return mask


class _Masked:
    """Mask handling shared by the masked modules."""

    weight: nn.Parameter
    mask: torch.Tensor

    def _where(self) -> str:
        """The layer's name in the op's errors and warnings, formatted once per module (not per forward: ~0.4 us on
        the dev VM); the attributes it shows are fixed at construction."""
        text = self.__dict__.get("_where_text")
        if text is None:
            text = self._where_text = self._describe()
        return text

    def __getstate__(self):
        # copies and pickles plan again on their first call (a plan holds the mask's index and storage)
        state = super().__getstate__()
        state.pop(_linear_op.PLAN_ATTR, None)
        return state

    def _init_mask(self, mask: torch.Tensor | None) -> None:
        full = torch.ones_like(self.weight, dtype=torch.bool, requires_grad=False)
        self.register_buffer("mask", full)
        if mask is not None:
            self.set_mask_(mask)

    @torch.no_grad()
    def set_mask_(self, mask: torch.Tensor) -> None:
        """Copy ``mask`` (bool, the weight's shape and device) into the mask buffer, in place."""
        self.mask.copy_(check_mask(mask, self.weight, type(self).__name__))

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zero the stored weight where the mask is False (in place; exact +0.0, also over NaN / inf)."""
        w = self.weight.detach()
        if w.is_floating_point():
            # The bit patterns as same-size integers times the mask: ~4x faster than masked_fill_ (see
            # lthfast.pruning.layers.zero_pruned_, which measured it on ResNet-50's weights).
            w = w.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()])
        w.mul_(self.mask)

    def masked_weight(self) -> torch.Tensor:
        return masked_weight(self.weight, self.mask)

    @property
    def density(self) -> float:
        return float(self.mask.float().mean()) if self.mask.numel() else 0.0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, density={self.density:.4f}"


class MaskedLinear(_Masked, nn.Linear):
    """nn.Linear computing ``x (W ⊙ M)^T + b``. Weight [out, in], mask [out, in] bool."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, mask=None
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_mask(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The layer's plan when it holds (the route of its last call, ops.linear.planned); else the op itself (what
        # functional.masked_linear calls, so that errors name this layer), which plans again.
        y = _linear_op.planned(self, x)
        if y is None:
            y = _linear_op.masked_linear(x, self.weight, self.mask, self.bias, where=self._where(), plan_for=self)
        return y

    def _describe(self) -> str:
        return f"{type(self).__name__}(in_features={self.in_features}, out_features={self.out_features})"

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None) -> MaskedLinear:
        """A MaskedLinear sharing ``linear``'s Parameter objects (so optimizers keep working)."""
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.in_features, out.out_features = linear.in_features, linear.out_features
        out.weight = linear.weight
        out.bias = linear.bias
        out.train(linear.training)
        out._init_mask(mask)
        return out

    def to_dense(self) -> nn.Linear:
        """A plain nn.Linear with weight W ⊙ M (new Parameters, same device and dtype)."""
        w = self.weight
        has_bias = self.bias is not None
        dense = nn.Linear(self.in_features, self.out_features, bias=has_bias, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.masked_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        dense.train(self.training)
        return dense


_CONV_ATTRS = (
    "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
    "transposed", "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice",
)  # fmt: skip


class MaskedConv2d(_Masked, nn.Conv2d):
    """nn.Conv2d computing ``conv2d(x, W ⊙ M)``. Weight and mask [Cout, Cin/groups, kh, kw]."""

    def __init__(self, *args, mask: torch.Tensor | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_mask(mask)

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = nn.functional.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        # The op itself (what functional.masked_conv2d calls), so that errors and the one-time groups > 1
        # warning name this layer.
        return _conv_op.masked_conv2d(
            x, weight, self.mask, bias, self.stride, padding, self.dilation, self.groups, where=self._where()
        )

    def _describe(self) -> str:
        return (
            f"{type(self).__name__}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, groups={self.groups})"
        )

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None) -> MaskedConv2d:
        """A MaskedConv2d sharing ``conv``'s Parameter objects (so optimizers keep working)."""
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        for name in _CONV_ATTRS:
            setattr(out, name, getattr(conv, name))
        out.weight = conv.weight
        out.bias = conv.bias
        out.train(conv.training)
        out._init_mask(mask)
        return out

    def to_dense(self) -> nn.Conv2d:
        """A plain nn.Conv2d with weight W ⊙ M (new Parameters, same device and dtype)."""
        w = self.weight
        dense = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, self.bias is not None, self.padding_mode, device=w.device, dtype=w.dtype,
        )  # fmt: skip
        with torch.no_grad():
            dense.weight.copy_(self.masked_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        dense.train(self.training)
        return dense
