"""Masked conv2d: validation -> torch.library custom ops (with fake impls) -> autograd -> ``masked_conv2d``.

The custom ops ``lthfast::masked_conv2d``, ``lthfast::masked_conv2d_grad_input`` and
``lthfast::masked_conv2d_grad_weight`` are the route on every device, so ``torch.compile`` sees one opaque op
per call (plain eager calls run the same three functions through an autograd.Function: ``lthfast.ops.eager``);
inside, ``lthfast._backend.use_triton`` picks the Triton kernels (``lthfast.kernels.masked_conv``)
or the dense path (``F.conv2d`` / ``convolution_backward`` on W*M, through ``lthfast.reference``).
Padding reaches the ops as (top, bottom, left, right), which also covers ``padding="same"`` with an even
dilated kernel (torch puts the extra row/column at the bottom/right).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lthfast import _backend
from lthfast.ops import autocast, sparse_cpu
from lthfast.ops.eager import differentiable_grads, eager_ok
from lthfast.ops.masking import mask_, masked
from lthfast.reference import masked_weight, transforms_active

# "auto" runs dense cuDNN on W*M when the tile density (fraction of alive weight tiles) is above this value,
# the Triton kernels at or below it. Measured on an H200 (bf16, ResNet-18 ImageNet layers 2-4, batch 128,
# benchmarks/results/masked_conv-h200.json): the kernels ran at 0.17-0.61x cuDNN at every tile density down to
# 0.023, forward and train step, so there is no crossover and "auto" stays dense for any mask with an alive tile
# (the "triton" backend still runs the kernels). Raise it when a GPU run measures one.
DENSE_TILE_DENSITY = 0.0

_warned_groups: set[str] = set()


# ---------------------------------------------------------------------------------------------- validation
def _pair(value, name: str, where: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{where}: {name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _padding(padding, kernel: Sequence[int], stride: tuple[int, int], dilation: tuple[int, int], where: str):
    """(top, bottom, left, right) from an int, a pair, "valid" or "same" (as ``F.conv2d`` reads them)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"{where}: padding string must be 'same' or 'valid', got {padding!r}")
        if stride != (1, 1):
            raise ValueError(f"{where}: padding='same' is not supported for strided convolutions (stride {stride})")
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
    ph, pw = _pair(padding, "padding", where, 0)
    return (ph, ph, pw, pw)


def _check(x, weight, mask, bias, groups, where: str) -> None:
    for name, t in (("x", x), ("weight", weight), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"{where}: weight must be 4-D [Cout, Cin/groups, kh, kw], got shape {tuple(weight.shape)}")
    if x.dim() not in (3, 4):
        raise ValueError(f"{where}: x must be [B, Cin, H, W] or unbatched [Cin, H, W], got shape {tuple(x.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{where}: mask must be bool, got {mask.dtype}")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"{where}: mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{where}: groups must be a positive int, got {groups!r}")
    cout, cin_g = weight.shape[:2]
    if min(weight.shape) == 0:
        raise ValueError(f"{where}: weight has an empty dimension: shape {tuple(weight.shape)}")
    if cout % groups:
        raise ValueError(f"{where}: out channels {cout} are not divisible by groups={groups}")
    if x.shape[-3] != cin_g * groups:
        raise ValueError(
            f"{where}: x has {x.shape[-3]} channels but weight {tuple(weight.shape)} with groups={groups} "
            f"expects {cin_g * groups}"
        )

    def mixed_ok() -> bool:  # the autocast rule casts them to one dtype; asked only when the dtypes differ
        return autocast.mixes(x.device.type, x, weight, bias)

    if not weight.is_floating_point() or (x.dtype != weight.dtype and not mixed_ok()):
        raise TypeError(f"{where}: x ({x.dtype}) and weight ({weight.dtype}) must share one floating dtype")
    tensors = [("x", x), ("mask", mask)]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (cout,):
            raise ValueError(f"{where}: bias must be a tensor of shape ({cout},), got {getattr(bias, 'shape', bias)}")
        if bias.dtype != weight.dtype and not mixed_ok():
            raise TypeError(f"{where}: bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
        tensors.append(("bias", bias))
    for name, t in tensors:
        if t.device != weight.device:
            raise ValueError(f"{where}: {name} is on {t.device} but the weight is on {weight.device}")


def _out_hw(h, w, kernel, stride, padding, dilation):
    p = (h + padding[0] + padding[1] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    q = (w + padding[2] + padding[3] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return p, q


def _memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """channels_last when x or the weight is (strictly) channels_last, as ``F.conv2d`` chooses its output."""
    for t in (x, weight):
        if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
    return torch.contiguous_format


def _mask_like(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The mask in the weight's memory format: W ⊙ M takes the mask's layout, and F.conv2d's output follows it
    (an NCHW layer with a channels_last mask answered in channels_last). A copy only when the layouts differ."""
    if mask.stride() == weight.stride():
        return mask
    channels_last = not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
    return mask.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# ---------------------------------------------------------------------------------------------- routing
@functools.cache
def _kernels():
    """The Triton kernel module, imported on first use so that CPU-only installs never import triton."""
    from lthfast.kernels import masked_conv

    return masked_conv


SPARSE = "sparse"  # the route of the CPU unstructured sparse kernels (lthfast.ops.sparse_cpu)


def _kernel_index(x: torch.Tensor, mask: torch.Tensor, groups: int, where: str | None = None):
    """The tile index when the Triton kernels should run this call, ``SPARSE`` for the CPU sparse kernels, None for
    the dense path.

    ``where`` (the forward's caller) gets the one-time groups > 1 warning; the gradient ops pass None.
    """
    if x.device.type == "cpu" and not _backend.use_triton(x) and sparse_cpu.use_conv(x, mask, groups):
        return SPARSE
    if groups != 1:
        if where is not None and where not in _warned_groups and _backend.use_triton(x):
            _warned_groups.add(where)
            warnings.warn(
                f"{where}: groups={groups} has no masked Triton kernel; using dense conv2d on W*M "
                "(this layer does not skip pruned weights)",
                stacklevel=2,
            )
        return None
    if x.numel() == 0 or mask.numel() == 0 or not _backend.use_triton(x):
        return None
    kernels = _kernels()
    if x.dtype not in kernels.KERNEL_DTYPES:
        return None
    index = kernels.conv_tile_index(mask)
    if _backend.get_backend() == "auto" and index.tile_density > DENSE_TILE_DENSITY:
        return None
    return index


def _symmetric(x: torch.Tensor, padding: Sequence[int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """x and the padding F.conv2d takes: asymmetric padding is applied to x, as torch does for "same"."""
    top, bottom, left, right = padding
    if top == bottom and left == right:
        return x, (top, left)
    return F.pad(x, (left, right, top, bottom)), (0, 0)


def _dense_backward(grad, x, weight, mask, stride, padding, dilation, groups, need_x: bool, need_w: bool):
    """(dX, dW*M) of the dense conv on W*M via ``convolution_backward`` (cuDNN on CUDA)."""
    xp, sym = _symmetric(x, padding)
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad, xp, masked(weight, mask), None, stride, sym, dilation, False, [0, 0], groups,
        [need_x, need_w, False],
    )  # fmt: skip
    if need_x and xp is not x:
        top, _, left, _ = padding
        grad_x = grad_x[:, :, top : top + x.shape[2], left : left + x.shape[3]]
    if need_w:
        grad_w = mask_(grad_w, mask)
    return grad_x, grad_w


def _strided_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of ``torch.empty_like(like)``, which the fake impls promise (copied only if needed)."""
    out = torch.empty_like(like)
    return t if t.stride() == out.stride() else out.copy_(t)


def _conv_fake(x, weight, mask, bias, stride, padding, dilation, groups, where):
    """The output of ``lthfast::masked_conv2d``, uninitialized: its shape, dtype and strides (the fake impl)."""
    p, q = _out_hw(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    fmt = _memory_format(x, weight)
    return torch.empty((x.shape[0], weight.shape[0], p, q), dtype=x.dtype, device=x.device, memory_format=fmt)


# ---------------------------------------------------------------------------------------------- custom ops
_UNSET = object()  # "the route is not decided yet" (None: the dense path)


def _route(x, mask, groups, where=None, index=_UNSET):
    """``_kernel_index``'s answer for this call; ``index`` when the caller decided it (an eager step, once)."""
    return _kernel_index(x, mask, groups, where) if index is _UNSET else index


def _forward(x, weight, mask, bias, stride, padding, dilation, groups, where, index=_UNSET):
    out = _conv_fake(x, weight, mask, bias, stride, padding, dilation, groups, where)
    index = _route(x, mask, groups, where, index)
    if index is SPARSE:
        y = sparse_cpu.conv_forward(x, weight, mask, bias, stride, padding, dilation, groups, _memory_format(x, weight))
        return y if y.stride() == out.stride() else out.copy_(y)
    if index is None:
        xp, sym = _symmetric(x, padding)
        y = F.conv2d(xp, masked(weight, mask), bias, stride, sym, dilation, groups)
        return y if y.stride() == out.stride() else out.copy_(y)
    kernels = _kernels()
    return kernels.conv2d_forward(x, weight, mask, bias, out, stride, padding, dilation, index)


@torch.library.custom_op("lthfast::masked_conv2d", mutates_args=())
def _conv_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    where: str,
) -> torch.Tensor:
    return _forward(x, weight, mask, bias, stride, padding, dilation, groups, where)


_conv_op.register_fake(_conv_fake)


def _grad_input(grad, x, weight, mask, stride, padding, dilation, groups, index=_UNSET):
    index = _route(x, mask, groups, None, index)
    if index is SPARSE:
        grad_x = sparse_cpu.conv_backward(grad, x, weight, mask, stride, padding, dilation, groups, True, False)[0]
        return _strided_like(grad_x.to(x.dtype), x)
    if index is None:
        grad_x = _dense_backward(grad, x, weight, mask, stride, padding, dilation, groups, True, False)[0]
        return _strided_like(grad_x, x)
    kernels = _kernels()
    return kernels.conv2d_grad_input(grad, weight, mask, torch.empty_like(x), stride, padding, dilation, index)


@torch.library.custom_op("lthfast::masked_conv2d_grad_input", mutates_args=())
def _grad_input_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    return _grad_input(grad, x, weight, mask, stride, padding, dilation, groups)


@_grad_input_op.register_fake
def _grad_input_fake(grad, x, weight, mask, stride, padding, dilation, groups):
    return torch.empty_like(x)


def _grad_weight(grad, x, weight, mask, stride, padding, dilation, groups, index=_UNSET):
    index = _route(x, mask, groups, None, index)
    if index is SPARSE:
        grad_w = sparse_cpu.conv_backward(grad, x, weight, mask, stride, padding, dilation, groups, False, True)[1]
        return _strided_like(grad_w.to(weight.dtype), weight)
    if index is None:
        grad_w = _dense_backward(grad, x, weight, mask, stride, padding, dilation, groups, False, True)[1]
        return _strided_like(grad_w, weight)
    kernels = _kernels()
    grad_w = torch.empty_like(weight)  # every entry written by the kernel, dead tiles included
    return kernels.conv2d_grad_weight(grad, x, mask, grad_w, stride, padding, dilation, index)


@torch.library.custom_op("lthfast::masked_conv2d_grad_weight", mutates_args=())
def _grad_weight_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    return _grad_weight(grad, x, weight, mask, stride, padding, dilation, groups)


@_grad_weight_op.register_fake
def _grad_weight_fake(grad, x, weight, mask, stride, padding, dilation, groups):
    return torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, mask, bias, stride, padding, dilation, groups, _ = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None


def _backward(ctx, grad, eager=False):
    x, weight, mask = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if eager:  # the forward's route, still the mask's (autograd's version check on the saved mask)
        grad_input = functools.partial(_grad_input, index=ctx.index)
        grad_weight = functools.partial(_grad_weight, index=ctx.index)
    else:
        grad_input = torch.ops.lthfast.masked_conv2d_grad_input
        grad_weight = torch.ops.lthfast.masked_conv2d_grad_weight
    if eager and torch.is_grad_enabled() and any(ctx.needs_input_grad[:2]):  # create_graph=True
        stride, padding, dilation, groups = ctx.conv

        def forward(x, w):
            xp, sym = _symmetric(x, padding)
            return F.conv2d(xp, w, None, stride, sym, dilation, groups)

        grad_x, grad_w = differentiable_grads(ctx, grad, forward)
    elif eager and ctx.index is SPARSE:  # both gradients from one lanes layout of dY (and the forward's of x)
        grad_x, grad_w = sparse_cpu.conv_backward(grad, x, weight, mask, *ctx.conv, *ctx.needs_input_grad[:2], ctx.xl)
        grad_x = None if grad_x is None else _strided_like(grad_x.to(x.dtype), x)
        grad_w = None if grad_w is None else _strided_like(grad_w.to(weight.dtype), weight)
    else:
        if ctx.needs_input_grad[0]:
            grad_x = grad_input(grad, x, weight, mask, *ctx.conv)
        if ctx.needs_input_grad[1]:
            grad_w = grad_weight(grad, x, weight, mask, *ctx.conv)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        # a bandwidth-bound reduction of dY: torch's sum already runs at memory speed, a kernel would not beat it
        grad_b = grad.sum(dim=(0, 2, 3), dtype=torch.float32).to(weight.dtype)
    return grad_x, grad_w, None, grad_b, None, None, None, None, None


_conv_op.register_autograd(_backward, setup_context=_setup_context)
# Under torch.autocast the forward computes in the autocast dtype, the gradients in the forward's dtypes.
autocast.register("masked_conv2d", cast=True)
autocast.register("masked_conv2d_grad_input", cast=False)
autocast.register("masked_conv2d_grad_weight", cast=False)


class _Eager(torch.autograd.Function):
    """The op in plain eager mode (``lthfast.ops.eager``): the same forward and gradients, no custom-op dispatch."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias, stride, padding, dilation, groups, where, index=_UNSET):
        inputs = (x, weight, mask, bias, stride, padding, dilation, groups, where)
        _setup_context(ctx, inputs, None)
        ctx.index = _route(x, mask, groups, where, index)  # one route decision per call, forward and backward
        ctx.xl = None
        if ctx.index is SPARSE and weight.requires_grad:  # dW reads x in the lanes layout the forward made
            out = _conv_fake(*inputs)
            y, ctx.xl = sparse_cpu.conv_forward(x, weight, mask, bias, stride, padding, dilation, groups,
                                                _memory_format(x, weight), keep_lanes=True)  # fmt: skip
            return y if y.stride() == out.stride() else out.copy_(y)
        return _forward(*inputs, ctx.index)

    @staticmethod
    def backward(ctx, grad):
        return (*_backward(ctx, grad, eager=True), None)


# ---------------------------------------------------------------------------------------------- public
def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    where: str = "masked_conv2d",
) -> torch.Tensor:
    """``F.conv2d(x, W ⊙ M, bias, stride, padding, dilation, groups)``; dW is exactly zero where M is False.

    x [B, Cin, H, W] or unbatched [Cin, H, W], NCHW or channels_last; weight [Cout, Cin/groups, kh, kw] and
    bias [Cout] in x's floating dtype; mask bool, weight's shape, same device. stride/dilation: int or pair;
    padding: int, pair, "same" or "valid". Returns [B, Cout, P, Q] (channels_last when x or the weight is).
    Nothing is modified in place. groups > 1 runs dense conv2d on W*M (warned once per ``where`` when the
    Triton kernels were otherwise due). ``where`` names the caller (the layer) in errors and warnings.
    Under ``torch.autocast`` x, weight and bias may differ in floating dtype: they are cast to the autocast
    dtype, which the result has (``lthfast.ops.autocast``).
    """
    _check(x, weight, mask, bias, groups, where)
    stride = _pair(stride, "stride", where, 1)
    dilation = _pair(dilation, "dilation", where, 1)
    padding = _padding(padding, weight.shape[2:], stride, dilation, where)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    p, q = _out_hw(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    if p < 1 or q < 1:
        raise ValueError(
            f"{where}: input {tuple(x.shape[2:])} with padding {padding} is smaller than the dilated kernel "
            f"{tuple(weight.shape[2:])} (dilation {dilation})"
        )
    x = x.contiguous(memory_format=_memory_format(x, weight))
    if eager_ok(x, weight, mask, bias):
        native, index = _eager_route(x, mask, groups, where)
        if native:
            xp, sym = _symmetric(x, padding)
            y = F.conv2d(xp, masked(weight, _mask_like(mask, weight)), bias, stride, sym, dilation, groups)  # in W
        else:
            y = _Eager.apply(x, weight, mask, bias, list(stride), list(padding), list(dilation), groups, where, index)
    elif transforms_active():  # torch.func / forward-mode AD: the reference composite
        xp, sym = _symmetric(x, padding)
        y = F.conv2d(xp, masked_weight(weight, mask), bias, stride, sym, dilation, groups)
    else:
        y = torch.ops.lthfast.masked_conv2d(x, weight, mask, bias, list(stride), list(padding), list(dilation), groups,
                                            where)  # fmt: skip
    return y.squeeze(0) if unbatched else y


def _eager_route(x: torch.Tensor, mask: torch.Tensor, groups: int, where: str):
    """(native, index) for a plain eager call. ``native``: the dense route as torch's own ops, ``F.conv2d`` on W ⊙ M
    (``lthfast.ops.masking.masked``, differentiable in the weight) with torch's C++ autograd instead of lthfast's
    Python Function (``lthfast.ops.linear``'s comment on the dense route): the same products, dW exactly zero where
    M is False; every call the Triton kernels do not take. ``index``: the kernels' tile index otherwise, handed to
    the Function so that a step decides its route once."""
    index = _kernel_index(x, mask, groups, where)
    return index is None, index
