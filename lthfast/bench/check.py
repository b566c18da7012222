"""Check a provider's outputs against ``lthfast.reference`` in float64 before it is timed.

The error of a tensor is max|out - ref| / max|ref| (normalised by the largest reference value, so that the
tolerance does not depend on the shape or the scale of the random data).
"""

from __future__ import annotations

import torch

from lthfast import reference

# float32 allows TF32: cuDNN convolutions use it by default and Triton's tl.dot uses it for fp32 inputs on
# Ampere/Hopper (10-bit mantissa, relative rounding 2^-11 = 4.9e-4 per product).
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 2e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}
NAMES = ("y", "dX", "dW", "db")


class CheckFailed(Exception):
    """A provider's outputs disagree with the reference; the message says which output and by how much."""


def reference_outputs(op: str, train: bool, weight, mask, bias, conv: dict, x, grad_out=None) -> tuple:
    """The reference ``(y,)`` or ``(y, dX, dW, db)`` in float64 for one input set (CPU or CUDA)."""
    x64 = x.detach().double().requires_grad_(train)
    w64 = weight.detach().double().requires_grad_(train)
    b64 = None if bias is None else bias.detach().double().requires_grad_(train)
    with torch.enable_grad():
        if op == "linear":
            y = reference.masked_linear(x64, w64, mask, b64)
        else:
            y = reference.masked_conv2d(x64, w64, mask, b64, **conv)
        if not train:
            return (y.detach(),)
        wanted = (x64, w64) if b64 is None else (x64, w64, b64)
        grads = torch.autograd.grad(y, wanted, grad_out.double())
    db = grads[2] if b64 is not None else None
    return y.detach(), grads[0], grads[1], db


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.layout == torch.strided:
        return t
    return t.to_dense()


def compare(outputs: tuple, expected: tuple, mask: torch.Tensor, dtype: torch.dtype, masked_dw: bool) -> float:
    """The largest normalised error over the outputs; raises ``CheckFailed`` above the dtype's tolerance.

    dW is compared where the mask is True (a dense provider computes the full dW); where ``masked_dw`` is set,
    dW must also be exactly zero where the mask is False.
    """
    tol = TOLERANCE[dtype]
    worst = 0.0
    for name, out, ref in zip(NAMES, outputs, expected):
        out = _dense(out)
        if (out is None) != (ref is None):
            raise CheckFailed(f"{name}: expected {'no tensor' if ref is None else 'a tensor'}, got the other")
        if out is None:
            continue
        if tuple(out.shape) != tuple(ref.shape):
            raise CheckFailed(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
        out = out.detach().double()
        if name == "dW":
            if masked_dw and bool((out[~mask] != 0).any()):
                raise CheckFailed("dW is nonzero where the mask is False")
            out, ref = out * mask, ref * mask
        if not bool(torch.isfinite(out).all()):
            raise CheckFailed(f"{name}: non-finite values")
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        err = float((out - ref).abs().max()) / scale if scale > 0 else float((out - ref).abs().max())
        if err > tol:
            raise CheckFailed(f"{name}: normalised error {err:.2e} > {tol:.0e} ({dtype})")
        worst = max(worst, err)
    return worst
