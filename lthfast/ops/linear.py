"""The masked linear op: validation, ``torch.library`` custom ops, autograd, and the public function.

Layers, top down:
  masked_linear(x, weight, mask, bias)      validates, flattens x to 2-D, calls the forward op
  autograd (register_autograd)              backward = lthfast::masked_linear_bwd + db = sum of dY
  lthfast::masked_linear_fwd / _bwd         custom ops with fake implementations (torch.compile traces them
                                            as opaque nodes, fullgraph), dispatching inside at run time
                                            (plain eager calls run the same two functions through an
                                            autograd.Function instead: lthfast.ops.eager; and on the dense
                                            route, torch's own ops: F.linear on W ⊙ M from
                                            lthfast.ops.masking.masked):
      Triton kernels (lthfast.kernels.masked_matmul)   when lthfast._backend.use_triton(...) says so
      torch path (lthfast.ops.linear_torch)             otherwise: block-sparse on CPU, or dense on W ⊙ M
The same ops run on every device, so a compiled graph does not depend on where the tensors live.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from lthfast import _backend
from lthfast.indexing.alive import alive_index
from lthfast.indexing.tiles import cached_on_mask
from lthfast.ops import autocast, crossover, linear_torch, sparse_cpu
from lthfast.ops.eager import differentiable_grads, eager_ok
from lthfast.ops.masking import masked
from lthfast.reference import masked_weight, transforms_active

# "auto" backend on CUDA: above this tile density cuBLAS on W ⊙ M beats the sparse kernels, so it is used
# instead (the "triton" backend always runs the kernels, so tests and benchmarks measure them). Measured on an
# H200, where the step is bound by host time: the figures are in docs/performance.md.
CUDA_DENSE_ABOVE = 0.05

# Plain eager calls on the dense route run as torch's own autograd ops, F.linear on W ⊙ M made by
# lthfast.ops.masking.masked, rather than through lthfast's autograd.Function for the whole op: on small layers the
# Function's Python was most of the step's host time, and on large ones the two cost the same (figures in
# docs/performance.md).

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPES = KERNEL_DTYPES + (torch.float64,)  # float64 runs on the torch path only (gradcheck, references)


@functools.cache
def _kernels():
    """The Triton kernel module, imported on first use so that CPU-only installs never import triton."""
    from lthfast.kernels import masked_matmul

    return masked_matmul


def _use_kernels(t: torch.Tensor) -> bool:
    if not _backend.use_triton(t):
        return False
    if t.dtype not in KERNEL_DTYPES:
        if _backend.get_backend() == "triton":
            raise TypeError(f"masked_linear: the Triton kernels take {KERNEL_DTYPES}, got {t.dtype}")
        return False
    return True


def _kernel_index(mask: torch.Tensor):
    """The tile index for the kernels, or None where the "auto" backend prefers dense (too many alive tiles)."""
    index = _kernels().mask_tile_index(mask)
    if _backend.get_backend() == "auto" and index.tile_density > CUDA_DENSE_ABOVE:
        return None
    return index


_UNSET = object()  # "the route is not decided yet" (None: the torch path)
SPARSE = "sparse"  # the CPU unstructured sparse kernels (lthfast.ops.sparse_cpu)
FULL, PARTIAL = "full", "partial"  # the native dense route on CPU, with every weight alive or not


def _route(x: torch.Tensor, mask: torch.Tensor, index=_UNSET):
    """The kernels' tile index for this call, or None for the torch path; ``index`` when the caller decided it."""
    if index is _UNSET:
        return _kernel_index(mask) if _use_kernels(x) else None
    return index


# ------------------------------------------------------------------------------------------- custom ops


def _forward(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, index=_UNSET):
    """Y [M, N] = x [M, K] (W ⊙ M)^T + bias; contiguous, x's dtype. Inputs already validated; ``index`` as
    ``_route`` returns it, when the caller has it."""
    index = _route(x, mask, index)
    if index is SPARSE:
        return sparse_cpu.linear_forward(x, weight, mask, bias)
    if index is not None:
        return _kernels().masked_linear_forward(x, weight, mask, bias, index)
    # contiguous, as the fake promises: the block path's result was a strided view when N is not a multiple of its
    # tile, which inductor's stride assertions reject in compiled graphs (a no-op when already contiguous)
    return linear_torch.forward(x, weight, mask, bias).contiguous()


@torch.library.custom_op("lthfast::masked_linear_fwd", mutates_args=())
def masked_linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Y [M, N] = x [M, K] (W ⊙ M)^T + bias; contiguous, x's dtype. Inputs already validated."""
    return _forward(x, weight, mask, bias)


@masked_linear_fwd.register_fake
def _(x, weight, mask, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _grads(grad, x, weight, mask, need_x: bool, need_w: bool, index=_UNSET) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX [M, K], dW [N, K]) for grad [M, N]; dW exactly zero where the mask is False.

    An output that is not needed (``need_x`` / ``need_w`` False) is returned as an empty [0] tensor.
    ``index`` as ``_route`` returns it, when the caller has it.
    """
    index = _route(x, mask, index)
    if index is SPARSE:
        grad_x, grad_w = sparse_cpu.linear_backward(grad, x, weight, mask, need_x, need_w)
    elif index is not None:
        kernels = _kernels()
        grad_x = kernels.masked_linear_grad_input(grad, weight, mask, index) if need_x else None
        grad_w = kernels.masked_linear_grad_weight(grad, x, mask, index) if need_w else None
    else:
        grad_x, grad_w = linear_torch.backward(grad, x, weight, mask, need_x, need_w)
    empty = x.new_empty(0)
    # contiguous, as the fake promises (see masked_linear_fwd)
    return (empty if grad_x is None else grad_x.contiguous()), (empty if grad_w is None else grad_w.contiguous())


@torch.library.custom_op("lthfast::masked_linear_bwd", mutates_args=())
def masked_linear_bwd(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, need_x: bool, need_w: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX [M, K], dW [N, K]) for grad [M, N]; dW exactly zero where the mask is False.

    An output that is not needed (``need_x`` / ``need_w`` False) is returned as an empty [0] tensor.
    """
    return _grads(grad, x, weight, mask, need_x, need_w)


@masked_linear_bwd.register_fake
def _(grad, x, weight, mask, need_x, need_w):
    grad_x = x.new_empty(x.shape) if need_x else x.new_empty(0)
    grad_w = x.new_empty(weight.shape) if need_w else x.new_empty(0)
    return grad_x, grad_w


def _setup_context(ctx, inputs, output) -> None:
    x, weight, mask, bias = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = bias is not None


def _backward(ctx, grad, eager=False):
    x, weight, mask = ctx.saved_tensors  # the mask unchanged since the forward (autograd's version check)
    need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
    grad_x = grad_w = grad_b = None
    if eager and torch.is_grad_enabled() and (need_x or need_w):  # create_graph=True
        grad_x, grad_w = differentiable_grads(ctx, grad, torch.nn.functional.linear)
    elif need_x or need_w:
        if eager:  # the forward's route, still the mask's
            grad_x, grad_w = _grads(grad, x, weight, mask, need_x, need_w, ctx.index)
        else:
            grad_x, grad_w = torch.ops.lthfast.masked_linear_bwd(grad, x, weight, mask, need_x, need_w)
    if need_b and ctx.has_bias:
        grad_b = grad.sum(0)
    return (grad_x if need_x else None), (grad_w if need_w else None), None, grad_b


torch.library.register_autograd("lthfast::masked_linear_fwd", _backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The op in plain eager mode (``eager_ok``): the same forward and gradients, no custom-op dispatch."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias, index=_UNSET):
        _setup_context(ctx, (x, weight, mask, bias), None)
        ctx.index = _route(x, mask, index)  # one route decision per call, forward and backward
        return _forward(x, weight, mask, bias, ctx.index)

    @staticmethod
    def backward(ctx, grad):
        return (*_backward(ctx, grad, eager=True), None)


# Under torch.autocast the forward computes in the autocast dtype, the backward in the forward's dtypes.
autocast.register("masked_linear_fwd", cast=True)
autocast.register("masked_linear_bwd", cast=False)


# ------------------------------------------------------------------------------------------- public function


def _eager_route(x: torch.Tensor, mask: torch.Tensor):
    """(native, index) for a plain eager call. ``native``: the dense route as torch's own ops, the same products as
    the dense route of ``_forward`` / ``_grads`` (dW = dY^T X ⊙ M, exact zeros, no NaN from a pruned weight) with
    torch's C++ autograd instead of lthfast's Python Function: every call but the kernels' and the CPU block
    route's. ``index``: the kernels' tile index, None for the torch path (as ``_route``), handed to the Function so
    that a step decides its route once."""
    if _use_kernels(x):
        index = _kernel_index(mask)
        return index is None, index
    # one lookup per call: the CPU decision cached on the mask with what it depends on besides the mask
    key = ("eager-route", x.shape[0], x.dtype, x.device.type, torch.get_num_threads(), crossover.state(),
           sparse_cpu.ENABLED)  # fmt: skip
    return cached_on_mask(mask, key, lambda: _cpu_route(x, mask))


def _cpu_route(x: torch.Tensor, mask: torch.Tensor):
    if linear_torch.plan(mask, x.shape[0], x.dtype) is not None:
        return False, None  # the CPU block route
    if sparse_cpu.use_linear(x, mask):
        return False, SPARSE
    return True, FULL if linear_torch.all_alive(mask) else PARTIAL  # the dense route, W itself when nothing is pruned


def _check(x, weight, mask, bias, where: str) -> None:
    for name, t in (("x", x), ("weight", weight), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if weight.dtype not in DTYPES:
        raise TypeError(f"{where}: weight dtype {weight.dtype} is not one of {DTYPES}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{where}: x shape {tuple(x.shape)} does not end in K={weight.shape[1]} (weight)")

    def mixed_ok() -> bool:  # the autocast rule casts them to one dtype; asked only when the dtypes differ
        return autocast.mixes(x.device.type, x, weight, bias)

    if x.dtype != weight.dtype and not mixed_ok():
        raise TypeError(f"{where}: x is {x.dtype} but the weight is {weight.dtype}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{where}: mask must be bool, got {mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(f"{where}: mask shape {tuple(mask.shape)} differs from weight {tuple(weight.shape)}")
    if x.device != weight.device or mask.device != weight.device:
        raise ValueError(f"{where}: x on {x.device}, weight on {weight.device}, mask on {mask.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]:
            raise ValueError(f"{where}: bias must be a tensor of shape [{weight.shape[0]}]")
        if (bias.dtype != weight.dtype and not mixed_ok()) or bias.device != weight.device:
            raise TypeError(f"{where}: bias is {bias.dtype} on {bias.device}, weight {weight.dtype}")


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    where: str = "masked_linear",
    plan_for: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Y = x (W ⊙ M)^T + b, differentiable in x, weight and bias; dW is exactly zero where M is False.

    x [..., K]; weight [N, K]; mask [N, K] bool; bias [N] or None; one device, one dtype (float32, float16,
    bfloat16; float64 on the torch path). Returns [..., N] in x's dtype. Nothing is modified in place.
    Under ``torch.autocast`` x, weight and bias may differ in dtype (float32/float16/bfloat16): all three are
    cast to the autocast dtype, which the result has (see ``lthfast.ops.autocast``).
    The tile index of ``mask`` is cached on the mask and rebuilt after any in-place change to it.
    ``where`` names the caller (e.g. the layer) in error messages. ``plan_for``: the MaskedLinear calling, which
    keeps this call's CPU route as its plan for the next calls (``planned``).
    """
    _check(x, weight, mask, bias, where)
    dim = x.dim()
    x2d = x if dim == 2 else x.flatten(0, -2) if dim > 1 else x.unsqueeze(0)  # not reshape(-1, K): K may be 0
    if eager_ok(x2d, weight, mask, bias):
        native, index = _eager_route(x2d, mask)
        if plan_for is not None and (index is FULL or index is PARTIAL or index is SPARSE):
            plan_for.__dict__[PLAN_ATTR] = _Plan(x, weight, mask, bias, index)
        if native:
            full = index is FULL or (index is None and linear_torch.all_alive(mask))
            w = weight if full else masked(weight, mask)  # differentiable in the weight
            y = torch.nn.functional.linear(x2d, w, bias)
        else:
            y = _Eager.apply(x2d, weight, mask, bias, index)
    elif transforms_active():  # torch.func / forward-mode AD: the reference composite
        y = torch.nn.functional.linear(x2d, masked_weight(weight, mask), bias)
    else:
        y = torch.ops.lthfast.masked_linear_fwd(x2d, weight, mask, bias)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])


# ------------------------------------------------------------------------------------------- per-module plans
#
# A MaskedLinear keeps the CPU route of its last plain eager call as a plan and, while what the route was decided on
# still holds, runs it without the op's validation and route lookup: on LeNet-300-100's small layers those were as
# long as the layer's products. The sparse route then runs as one lean autograd.Function (bias gradient included in
# the kernel call).

PLAN_ATTR = "_lthfast_plan"


def _plan_state() -> tuple:
    """What a CPU route depends on besides the tensors: threads, the crossover table, the sparse route's switch, the
    backend and Triton's interpreter flag."""
    return (
        torch.get_num_threads(), crossover.state(), sparse_cpu.ENABLED, _backend.get_backend(),
        _backend.interpreter_enabled(),
    )  # fmt: skip


class _Plan:
    """The route of one MaskedLinear call and what it was decided on. The plan holds the mask's storage, so that no
    new storage can take its address while the plan compares it (a mask swapped by ``mask.data = new``)."""

    __slots__ = ("mask", "storage", "version", "address", "x_shape", "w_shape", "b_shape", "dtype", "state", "route",
                 "index")  # fmt: skip

    def __init__(self, x, weight, mask, bias, route) -> None:
        self.mask, self.storage = mask, mask.untyped_storage()
        self.version, self.address = mask._version, mask.data_ptr()
        self.x_shape, self.w_shape, self.dtype = x.shape, weight.shape, x.dtype
        self.b_shape = None if bias is None else bias.shape
        self.state, self.route = _plan_state(), route
        # what the route reads besides the tensors: the alive index, or the mask as 0 / 1 of the weight's dtype
        self.index = (
            alive_index(mask) if route is SPARSE else _mask_as(mask, weight.dtype) if route is PARTIAL else None
        )


def _plain_eager() -> bool:
    """``eager_ok``'s conditions that do not depend on the tensors, with autocast asked for the CPU."""
    return not (
        torch.compiler.is_compiling() or transforms_active() or _get_current_dispatch_mode() is not None
        or torch._C._is_torch_function_mode_enabled() or torch.is_autocast_enabled("cpu")
    )  # fmt: skip


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def planned(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``module``'s forward through its plan, or None when it has none or the plan no longer holds (then the caller
    runs ``masked_linear``, which validates, decides and plans again)."""
    if torch.compiler.is_compiling():  # traced: the op's custom ops, never a plan's checks on addresses
        return None
    plan = module.__dict__.get(PLAN_ATTR)
    if plan is None or type(x) is not torch.Tensor or x.shape != plan.x_shape or x.dtype is not plan.dtype:
        return None
    weight = module._parameters.get("weight")
    bias = module._parameters.get("bias")
    mask = module._buffers.get("mask")
    if (
        mask is not plan.mask or mask._version != plan.version or mask.data_ptr() != plan.address
        or type(weight) not in _PLAIN_TYPES or weight.dtype is not plan.dtype or weight.shape != plan.w_shape
        or not x.is_cpu or not weight.is_cpu
    ):  # fmt: skip
        return None
    if bias is None:
        if plan.b_shape is not None:
            return None
    elif (
        type(bias) not in _PLAIN_TYPES or bias.dtype is not plan.dtype or bias.shape != plan.b_shape
        or not bias.is_cpu
    ):  # fmt: skip
        return None
    if not _plain_eager() or _plan_state() != plan.state:
        return None
    dim = x.dim()
    x2d = x if dim == 2 else x.flatten(0, -2) if dim > 1 else x.unsqueeze(0)
    route = plan.route
    if route is FULL:
        y = torch.nn.functional.linear(x2d, weight, bias)
    elif route is PARTIAL:
        y = _partial(x2d, weight, mask, bias, plan.index)
    elif torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        y = _SparseLinear.apply(x2d, weight, bias, mask, plan.index)
    else:
        y = sparse_cpu.linear_forward(x2d, weight, mask, bias, plan.index)
    return y if dim == 2 else y.view(*x.shape[:-1], weight.shape[0])


def _partial(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, mask_as: torch.Tensor
) -> torch.Tensor:
    """F.linear on W ⊙ M for a planned dense-route call: W times ``mask_as`` (the mask as floats, held by the plan),
    native autograd both ways (on an IMP MLP's 256x256 layer a third of the exact product's cost: no Python Function,
    no integer views). It equals the exact product wherever the pruned weights are finite (w * 0 is a signed zero),
    and a non-finite pruned weight makes the result non-finite (NaN * 0 and inf * 0 are NaN): then the call is made
    again with the exact product, so a NaN stored under a pruned entry still never leaks. dW = (dY^T X) ⊙ M is a
    signed zero where pruned."""
    y = torch.nn.functional.linear(x, weight * mask_as, bias)
    if math.isfinite(float(y.detach().sum())):
        return y
    return torch.nn.functional.linear(x, masked(weight, mask), bias)


def _mask_as(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bool mask as 0 / 1 of ``dtype``, cached on the mask."""
    return cached_on_mask(mask, ("as", dtype), lambda: mask.to(dtype))


class _SparseLinear(torch.autograd.Function):
    """The sparse CPU route of a planned call: ``sparse_cpu``'s forward and one backward call for dX, dW and db."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, index):
        ctx.save_for_backward(x, weight, mask)  # the mask too: changed before backward is an error, as elsewhere
        ctx.index = index
        return sparse_cpu.linear_forward(x, weight, mask, bias, index)

    @staticmethod
    def backward(ctx, grad):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled() and (need_x or need_w):  # create_graph=True: differentiable gradients
            grad_x, grad_w = differentiable_grads(ctx, grad, torch.nn.functional.linear)
            return grad_x, grad_w, grad.sum(0) if need_b else None, None, None
        x, weight, mask = ctx.saved_tensors
        grads = sparse_cpu.linear_backward(grad, x, weight, mask, need_x, need_w, need_b, ctx.index)
        return grads[0], grads[1], grads[2] if need_b else None, None, None
