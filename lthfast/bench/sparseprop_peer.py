"""SparseProp (Nikdan et al., ICML 2023; PyPI ``sparseprop``) as a peer that ``lthfast bench`` measures.

SparseProp keeps a layer's weight compressed: ``SparseLinear`` stores CSR values (``W_val``, a Parameter) and
indices (``W_idx``), ``SparseConv2d`` values plus per-(Cout, Cin) offsets and uint8 tap positions. Its
constructors take a dense weight and keep its nonzeros, so a module is built from ``W ⊙ M`` after every mask
change (an alive weight that is exactly zero is dropped: it would get no gradient). Its AVX2 kernels run on the
OpenMP runtime torch loaded (one ``libgomp.so.1`` per process), so ``torch.set_num_threads`` sets its threads.

Its conv has two kernels: vectorized over the batch (the default, ``vectorizing_over_on=False``) and over the
output width (``True``; its forward falls back to the batch kernel at stride 2). The batch kernel's forward is
wrong when the batch is not a multiple of 8, and the output-width backward is wrong at stride 2: the benchmarks
check every output and gradient against the float64 reference before timing, and report these as errors.

The package is optional (``make bench-deps``); without it every SparseProp entry is skipped with that reason.
"""

from __future__ import annotations

import torch
from torch import nn

from lthfast import reference
from lthfast.bench.providers import Unsupported

INSTALL_HINT = "pip install --no-build-isolation sparseprop, or make bench-deps"


def load():
    """``sparseprop.modules`` (SparseLinear, SparseConv2d), or ``Unsupported`` saying why it cannot run here."""
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        import sparseprop.modules as modules
    except ImportError as exc:  # not installed, or its compiled 'backend' module is missing
        raise Unsupported(f"sparseprop is not installed ({exc}); {INSTALL_HINT}") from exc
    if capability not in ("AVX2", "AVX512"):  # its kernels use AVX2 + FMA unconditionally (SIGILL without)
        raise Unsupported(f"sparseprop needs AVX2 and FMA; this CPU reports {capability}")
    return modules


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_unsupported(shape, stride, padding, dilation, groups) -> str | None:
    """Why SparseConv2d cannot compute this conv (None if it can). ``shape``: [Cout, Cin/groups, kh, kw]."""
    _, cin, kh, kw = shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    if groups != 1 or (dh, dw) != (1, 1):
        return f"SparseConv2d has no groups or dilation (groups={groups}, dilation={(dh, dw)})"
    if kh != kw or sh != sw or ph != pw:
        return f"SparseConv2d takes a square kernel, stride and padding (kernel {kh}x{kw}, stride {sh}x{sw})"
    if sh not in (1, 2):
        return f"SparseConv2d has stride 1 and 2 kernels only, got {sh}"
    if kh > 255 or cin * kh * kw > 32767:  # uint8 tap positions, int16 offsets within an output channel
        return f"SparseConv2d's index types cannot hold Cin x kh x kw = {cin}x{kh}x{kw}"
    return None


def build_linear(weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, train: bool = True):
    """``SparseLinear`` from the dense weight [N, K] and its bool mask: what a user rebuilds after a prune."""
    modules = load()
    dense = reference.masked_weight(weight, mask).detach().float().contiguous()
    b = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=train)
    module = modules.SparseLinear(dense, bias=b)
    module.W_val.requires_grad_(train)
    return module


def build_conv(weight, mask, bias, stride, padding, over_width: bool = False, train: bool = True):
    """``SparseConv2d`` from the dense weight [Cout, Cin, k, k] and its mask; ``over_width`` picks the kernel that
    vectorizes over the output width instead of the batch. Call ``conv_unsupported`` first."""
    modules = load()
    dense = reference.masked_weight(weight, mask).detach().float().contiguous()
    b = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=train)
    module = modules.SparseConv2d(
        dense, bias=b, padding=_pair(padding)[0], stride=_pair(stride)[0], vectorizing_over_on=over_width
    )
    module.W_val.requires_grad_(train)
    return module


def dense_weight(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """Values in ``module``'s compressed layout (its ``W_val`` or a gradient of it) as the dense weight tensor."""
    from sparseprop.modules.utils import from_csr_2d, from_sparse_format_conv2d

    values = values.detach().float()
    if hasattr(module, "OC"):  # SparseConv2d
        return from_sparse_format_conv2d(values, module.W_idx, (module.OC, module.IC, module.K, module.K))
    return from_csr_2d(values, module.W_idx, (module.N, module.M))


def is_sparseprop(module: nn.Module) -> bool:
    return hasattr(module, "W_val") and hasattr(module, "W_idx")


def convertible(module: nn.Module) -> str | None:
    """Why a Linear / Conv2d of a model cannot become a SparseProp module (None if it can)."""
    if module.weight.dtype != torch.float32 or module.weight.device.type != "cpu":
        return f"SparseProp runs float32 on the CPU only, got {module.weight.dtype} on {module.weight.device}"
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return f"SparseConv2d pads with zeros by a number, got {module.padding!r} ({module.padding_mode})"
        w = module.weight
        return conv_unsupported(tuple(w.shape), module.stride, module.padding, module.dilation, module.groups)
    return None


def build_module(module: nn.Module, mask: torch.Tensor) -> nn.Module:
    """The SparseProp twin of an nn.Linear / nn.Conv2d under ``mask`` (its default kernels)."""
    if isinstance(module, nn.Linear):
        return build_linear(module.weight, mask, module.bias)
    return build_conv(module.weight, mask, module.bias, module.stride, module.padding)
