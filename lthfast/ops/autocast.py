"""How the masked custom ops behave under ``torch.autocast`` (CPU and CUDA, float16 and bfloat16).

Without a rule of their own, custom ops fall through autocast: they receive float32 inputs and whatever runs
inside them is autocast op by op, so the dense path returned bf16 while the block-sparse CPU path and the
Triton kernels returned float32, and the fake implementations (float32) disagreed with the real output.

The rule registered here makes each op one autocast unit, like ``aten::linear`` and ``aten::conv2d``:
  forward ops   floating inputs (x, weight, bias) on the autocast device are cast to the autocast dtype read
                at call time (``torch.get_autocast_dtype``: bf16 or fp16), then the op runs with autocast off.
                The weight Parameter keeps its dtype (``.to`` is differentiable: its gradient arrives in the
                Parameter's dtype); the mask is bool and is never cast or promoted; float64 is left alone.
  backward ops  run with autocast off on the dtypes they are given (those of the forward's saved tensors).
``torch.library.register_autocast`` is not used because it fixes one cast dtype at registration, and the
fp16 and bf16 regions must both work. The rule is a dispatcher kernel, so ``torch.compile`` traces through it
(the casts appear in the graph, the op stays one opaque node).
"""

from __future__ import annotations

import torch

# float64 is not cast, as aten's autocast leaves it alone (it is the reference dtype of the tests).
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)
_lib = torch.library.Library("lthfast", "IMPL")  # noqa: TOR901 - the ops are defined by torch.library.custom_op


def _cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.device.type == device_type and value.dtype in _CASTABLE:
        return value.to(dtype)
    return value


def register(op_name: str, *, cast: bool) -> None:
    """Register the autocast rule of ``lthfast::<op_name>`` for CPU and CUDA.

    cast=True (forward ops): floating inputs are cast to the autocast dtype; cast=False (backward ops): the
    inputs pass unchanged. In both cases the op body runs with autocast disabled for that device.
    """
    op = getattr(torch.ops.lthfast, op_name).default
    for device_type in ("cpu", "cuda"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

        def kernel(_keyset, *args, device_type=device_type, excluded=excluded):
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                if cast:
                    dtype = torch.get_autocast_dtype(device_type)
                    args = tuple(_cast(a, device_type, dtype) for a in args)
                return op(*args)

        _lib.impl(op_name, kernel, key_name, with_keyset=True)


def mixes(device_type: str, *tensors: torch.Tensor | None) -> bool:
    """True when autocast is on for ``device_type`` and every given tensor is one the rule casts: then they may
    differ in dtype (the op sees them cast to one). The ops' validation uses it to accept, e.g., a bf16
    activation from the previous autocast layer with a float32 weight."""
    if not torch.is_autocast_enabled(device_type):
        return False
    return all(t.dtype in _CASTABLE for t in tensors if isinstance(t, torch.Tensor))
