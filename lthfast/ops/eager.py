"""When a masked op may skip ``torch.library`` dispatch and run its functions through a plain autograd.Function.

The custom ops (``lthfast::masked_linear_fwd``, ``lthfast::masked_conv2d`` ...) are what torch.compile traces
(opaque nodes with fake implementations), what the autocast rule is registered on, and what functorch
transforms, dispatch modes (fake tensors, FlopCounterMode, opcheck) and tensor subclasses see. In plain eager
mode none of that applies, and the dispatch costs ~0.6 ms per op call in Python (custom op wrapper, autograd
wrapper, default filling): more than the whole GEMM of a small layer (an IMP MLP's 256x256 layer at batch 100:
training step 1.7 ms against dense F.linear's 0.9 ms, 1 thread of the 2-core EPYC VM). There the same forward and
backward functions run through a ``torch.autograd.Function`` instead: the same numerics, no dispatch. Where the
call takes the dense route (every layer but the kernels' and the CPU block route's) even that Function is
skipped: ``F.linear`` / ``F.conv2d`` on W ⊙ M (``lthfast.ops.masking.masked``) with torch's C++ autograd (see the
comment on the dense route in lthfast.ops.linear).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from lthfast.reference import masked_weight, transforms_active

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_ok(*tensors: torch.Tensor | None) -> bool:
    """True when nothing but plain eager autograd would see the op: not compiling, no functorch transform or
    forward-AD level, no dispatch or torch-function mode, no autocast on the tensors' device, only plain tensors.
    The callers have checked that the tensors share one device (autocast is asked for the first one's)."""
    if torch.compiler.is_compiling() or transforms_active():
        return False
    if _get_current_dispatch_mode() is not None or torch._C._is_torch_function_mode_enabled():
        return False
    first = None
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN:
            return False
        if first is None:
            first = t
    return first is None or not torch.is_autocast_enabled(first.device.type)


def differentiable_grads(ctx, grad: torch.Tensor, forward) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dX, dW) of an eager Function's op when its backward runs with ``create_graph=True`` (double backward, a
    gradient penalty): ``forward(x, W ⊙ M)`` recomputed with torch ops (``torch.where``) and differentiated with a
    graph, so that the gradients are themselves differentiable. The kernels' and the CPU block route's backward
    are not: their gradients would enter the second derivative as constants. ``ctx.saved_tensors`` starts with
    (x, weight, mask); a gradient not in ``ctx.needs_input_grad`` is None."""
    x, weight, mask = ctx.saved_tensors[:3]
    needs = ctx.needs_input_grad[:2]
    wanted = [t for t, need in zip((x, weight), needs) if need]
    with torch.enable_grad():
        y = forward(x, masked_weight(weight, mask))
    grads = iter(torch.autograd.grad(y, wanted, grad, create_graph=True))
    return next(grads) if needs[0] else None, next(grads) if needs[1] else None
