"""W ⊙ M on the torch paths: ``reference.masked_weight``'s bits (exact zeros, a NaN under a pruned entry never leaks)
from one integer multiply of the weight's bit pattern by the mask as 0/1 integers, cached on CPU masks.

``weight.view(ints) * mask`` with a bool mask converts the mask to ``ints`` on every call: for LeNet-300's 300x784
layer a 53 us copy before a 42 us multiply (1 thread of the 2-core dev box), and a training step on the dense route
makes three such products per layer (forward, dX, dW). CPU masks keep their integer copy cached (``mask_bits``),
dropped when the mask changes; it costs the integer's width per weight (4 bytes for fp32), as
torch.nn.utils.prune's float mask does. CUDA masks are not cached (GPU memory; the conversion fuses there).
"""

from __future__ import annotations

import torch

from lthfast.indexing.tiles import cached_on_mask
from lthfast.reference import SAME_WIDTH_INT, masked_weight


def mask_bits(mask: torch.Tensor, ints: torch.dtype) -> torch.Tensor:
    """The bool ``mask`` as 0/1 integers of dtype ``ints``: cached on the mask on CPU, the mask itself elsewhere."""
    if mask.device.type != "cpu":
        return mask
    return cached_on_mask(mask, ("bits", ints), lambda: mask.to(ints))


def _ints(t: torch.Tensor, mask: torch.Tensor) -> torch.dtype | None:
    return SAME_WIDTH_INT.get(t.dtype) if mask.dtype == torch.bool else None


# Under autograd on CPU, from this many weights on, W ⊙ M is the integer multiply in an autograd.Function
# (``_MaskedWeight``: the same multiply on the gradient) rather than ``torch.where`` (whose backward is a second
# where). where's CPU kernel branches on the mask (1-4 ns per weight for a random mask); the Function costs ~20 us
# more in Python per forward and backward. ``w_m = f(w); w_m.backward(g)``, 1 thread of the 2-core dev box, 50%
# random mask, median of 15 interleaved rounds of 50 (us, where / Function): 1024 weights 24.9 / 42.9, 4096 30.6 /
# 45.1, 9216 40.4 / 48.2, 16384 54.0 / 52.7, 36864 100.2 / 67.8.
AUTOGRAD_INT_MIN_WEIGHT = 16384


class _MaskedWeight(torch.autograd.Function):
    """W ⊙ M differentiable in W, with ``masked_weight``'s bits forward and backward (dW = dY ⊙ M, exact +0.0 where
    M is False): one integer multiply each way, by the mask's cached bits."""

    @staticmethod
    def forward(ctx, weight, mask):
        ctx.save_for_backward(mask)  # an in-place change of the mask before backward is an error, as with where
        return masked(weight.detach(), mask)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return masked(grad, mask), None


_zeros: dict = {}


def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim zero of ``dtype`` on ``device``, never written to, kept from the first call that is not captured
    into a CUDA graph (whose allocations only hold data when it replays): a fresh one per call cost ~1.7 us on CPU
    and a fill kernel launch on CUDA. Only real tensors reach here (eager calls and the custom ops' bodies)."""
    key = (dtype, device)
    zero = _zeros.get(key)
    if zero is None:
        zero = torch.zeros((), dtype=dtype, device=device)
        if not (zero.is_cuda and torch.cuda.is_current_stream_capturing()):
            _zeros[key] = zero
    return zero


def masked(weight: torch.Tensor, mask: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """W ⊙ M as a new tensor (or into ``out``, weight's shape and dtype, outside autograd only); differentiable in
    the weight when autograd records it (``torch.where``, or ``_MaskedWeight`` from AUTOGRAD_INT_MIN_WEIGHT weights
    on on CPU: the same bits)."""
    ints = _ints(weight, mask)
    if ints is None or (weight.requires_grad and torch.is_grad_enabled()):
        if ints is None:
            product = masked_weight(weight, mask)
        elif out is None and weight.device.type == "cpu" and weight.numel() >= AUTOGRAD_INT_MIN_WEIGHT:
            return _MaskedWeight.apply(weight, mask)
        else:  # masked_weight's where, with a zero made once
            product = torch.where(mask, weight, _zero(weight.dtype, weight.device))
        return product if out is None else out.copy_(product)
    bits = mask_bits(mask, ints)
    if out is None:
        return weight.view(ints).mul(bits).view(weight.dtype)
    torch.mul(weight.view(ints), bits, out=out.view(ints))
    return out


def mask_(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``t`` ⊙ M in place when ``t`` is contiguous (a fresh product's own memory), else a new tensor."""
    ints = _ints(t, mask)
    if ints is None or not t.is_contiguous():
        return masked_weight(t, mask)
    t.view(ints).mul_(mask_bits(mask, ints))
    return t
