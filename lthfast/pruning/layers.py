"""Find the prunable weights of a model: nn.Linear / nn.Conv2d weights, masked or not, by fully qualified name.

A prunable weight is named like its parameter in ``model.named_parameters()`` ("fc1.weight",
"layers.0.conv.weight"). Three layouts hold one:
  "masked" - lthfast MaskedLinear / MaskedConv2d: Parameter ``weight``, bool buffer ``mask``;
  "torch"  - a module pruned with torch.nn.utils.prune: Parameter ``weight_orig``, float buffer
             ``weight_mask``, plain attribute ``weight = weight_orig * weight_mask`` (keyed as "<module>.weight");
  "plain"  - nn.Linear / nn.Conv2d: Parameter ``weight`` and no mask (pruning zeroes the stored weight).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from lthfast.nn import MaskedConv2d, MaskedLinear

PRUNABLE_TYPES = (nn.Linear, nn.Conv2d)
MASKED_TYPES = (MaskedLinear, MaskedConv2d)


@dataclass(frozen=True)
class Layer:
    """One prunable weight: its name, module, layout and the Parameter that holds the stored values."""

    name: str
    module_name: str
    module: nn.Module
    layout: str  # "masked" | "torch" | "plain"

    @property
    def param(self) -> nn.Parameter:
        """The stored weight Parameter (``weight_orig`` for the torch layout)."""
        attr = "weight_orig" if self.layout == "torch" else "weight"
        param = self.module._parameters.get(attr)  # without nn.Module.__getattr__ (a hot path)
        return getattr(self.module, attr) if param is None else param

    def current_mask(self) -> torch.Tensor | None:
        """The mask the module holds now as a bool tensor (a view for "masked"), or None for "plain"."""
        if self.layout == "masked":
            return self.module.mask
        if self.layout == "torch":
            return self.module.weight_mask != 0
        return None

    @torch.no_grad()
    def write_mask_(self, mask: torch.Tensor) -> None:
        """Store ``mask`` (validated bool, the weight's shape/device) and zero the pruned stored weights."""
        if self.layout == "masked":
            self.module.set_mask_(mask)
            zero_pruned_(self.module.weight, mask)
            return
        if self.layout == "torch":
            self.module.weight_mask.copy_(mask)
            zero_pruned_(self.module.weight_orig, mask)
            self._refresh_torch_weight()
            return
        zero_pruned_(self.module.weight, mask)

    @torch.no_grad()
    def enforce_mask_(self) -> None:
        """Zero the stored weights where the module's own mask is False (no-op for "plain")."""
        if self.layout == "masked":
            zero_pruned_(self.module.weight, self.module.mask)
        elif self.layout == "torch":
            zero_pruned_(self.module.weight_orig, self.module.weight_mask != 0)
            self._refresh_torch_weight()

    def _refresh_torch_weight(self) -> None:
        # torch's layout: ``weight`` is the attribute orig * mask (its forward pre-hook recomputes it too).
        with torch.enable_grad():
            self.module.weight = self.module.weight_orig * self.module.weight_mask.to(self.param.dtype)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def zero_pruned_(tensor: torch.Tensor, mask: torch.Tensor) -> None:
    """``tensor[~mask] = 0`` in place (exact +0.0, also over NaN / inf); ``mask`` bool, same shape and device.

    Multiplies the bit patterns, viewed as integers, by the mask: 32 ms instead of masked_fill_'s 130 ms (and
    float mul_'s 49 ms, which keeps NaN) for ResNet-50's 25.5M float32 weights on one thread of the 2-core
    EPYC VM.
    """
    t = tensor.detach()
    if t.is_floating_point():
        t = t.view(_SAME_SIZE_INT[t.element_size()])
    t.mul_(mask)


def write_masks_fast_(pairs: list[tuple[Layer, torch.Tensor]]) -> list[bool]:
    """``write_mask_`` for the CPU masked layers of ``pairs`` in one pass of lthfast._C over all of them: the
    masks go into the mask buffers and the pruned weights are zeroed (bits, as ``zero_pruned_``), rewriting a
    weight only where it changes. Returns which pairs it wrote; the caller writes the others. Validated pairs
    only (``Masks.layers_of``). Without the extension, nothing is written.

    ResNet-50's 54 masked layers (25.5M float32 weights), 2 threads of the 2-core EPYC dev box, medians of 8:
    16.0 ms against 27.4 ms for ``set_mask_`` + ``zero_pruned_`` layer by layer when 20% of the weights become
    dead, 16.6 against 24.6 ms at 13.4% -> 10.7% density (IMP round 10).
    """
    from lthfast import _backend

    done = [False] * len(pairs)
    ext = _backend.ext()
    if ext is None or not hasattr(ext, "write_masks"):
        return done
    items = []
    for i, (layer, mask) in enumerate(pairs):
        if layer.layout != "masked":
            continue
        weight, buffer = layer.module.weight.detach(), layer.module.mask
        if (
            weight.device.type == "cpu"
            and weight.is_floating_point()
            and weight.element_size() in (2, 4, 8)
            and weight.is_contiguous()
            and buffer.is_contiguous()
            and mask.is_contiguous()
        ):
            items.append((i, weight, buffer, mask))
    if not items:
        return done
    ext.write_masks(
        [w.data_ptr() for _, w, _, _ in items],
        [w.element_size() for _, w, _, _ in items],
        [b.data_ptr() for _, _, b, _ in items],
        [m.data_ptr() for _, _, _, m in items],
        [w.numel() for _, w, _, _ in items],
        torch.get_num_threads(),
        1 << 16,
    )
    # Written through raw pointers: bump the version counters as the in-place torch ops would (the tile index
    # cache is keyed on the mask's, autograd checks the weight's; a detached tensor shares its source's).
    torch.autograd.graph.increment_version([t for _, w, b, _ in items for t in (w, b)])
    for i, _, _, _ in items:
        done[i] = True
    return done


def any_alive(mask: torch.Tensor) -> bool:
    """Whether a bool mask has a True entry (``amax`` over uint8: 1 ms vs ``any``'s 45 ms for 25.5M entries).

    A live layer nearly always has an alive entry among its first 4096: checking those first settles it
    without reading the rest (ResNet-50's 54 masks at IMP densities: ~1 ms instead of 2.5 ms per check).
    """
    if mask.numel() == 0:
        return False
    u8 = mask.view(torch.uint8)
    if u8.numel() > 4096 and u8.is_contiguous() and bool(u8.view(-1).narrow(0, 0, 4096).amax()):
        return True
    return bool(u8.amax())


def alive_flags(masks: list[torch.Tensor]) -> list[bool]:
    """``[any_alive(m) for m in masks]``, the contiguous CPU masks in one lthfast._C call (~1 ms of torch calls
    for ResNet-50's 54 masks on the 2-core dev box, against a few us)."""
    from lthfast import _backend

    ext = _backend.ext()
    fast = [ext is not None and m.is_cpu and m.dtype == torch.bool and m.is_contiguous() for m in masks]
    out = [None] * len(masks)
    if any(fast):
        idx = [i for i, f in enumerate(fast) if f]
        for i, flag in zip(idx, ext.any_nonzero([masks[i].data_ptr() for i in idx], [masks[i].numel() for i in idx])):
            out[i] = flag
    return [any_alive(m) if flag is None else flag for m, flag in zip(masks, out)]


def is_torch_pruned(module: nn.Module, name: str = "weight") -> bool:
    """True when ``module.<name>`` is reparametrized by torch.nn.utils.prune (``<name>_orig`` / ``<name>_mask``)."""
    return f"{name}_orig" in module._parameters and f"{name}_mask" in module._buffers


def masked_state_keys(model: nn.Module) -> dict[str, tuple[str, str]]:
    """The state_dict entries that hold a stored weight under a mask: {key of the stored tensor: (key of the
    mask, the key W ⊙ M has in the unpruned model)}. Masked modules' ``weight`` / ``mask``, and every tensor that
    torch.nn.utils.prune reparametrized (``<name>_orig`` / ``<name>_mask``), of any module (a pruned bias, an
    nn.Embedding). Modules reached twice are listed under every prefix, as state_dict lists them."""
    out = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, MASKED_TYPES):
            out[prefix + "weight"] = (prefix + "mask", prefix + "weight")
        for key in module._parameters:
            name = key[: -len("_orig")]
            if key.endswith("_orig") and is_torch_pruned(module, name):
                out[prefix + key] = (prefix + name + "_mask", prefix + name)
    return out


def _as_patterns(patterns: str | Iterable[str] | None, what: str) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    out = list(patterns)
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"{what}: patterns must be strings, got {p!r}")
    return out


def matches(pattern: str, name: str) -> bool:
    """fnmatch ``pattern`` against a weight name ("fc1.weight") or its module name ("fc1")."""
    module_name = name.rsplit(".", 1)[0] if "." in name else ""
    return fnmatch.fnmatchcase(module_name, pattern) or fnmatch.fnmatchcase(name, pattern)


def _weight_name(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``list(model.named_modules())``: the same names, order (pre-order) and dedup (a module reached twice is
    listed, with its subtree, at its first place only), walked with a stack instead of nested generators."""
    out, seen, stack = [], set(), [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        out.append((name, module))
        children = module._modules
        if children:
            prefix = name + "." if name else ""
            stack.extend((prefix + n, c) for n, c in reversed(children.items()) if c is not None)
    return out


def all_layers(model: nn.Module) -> list[Layer]:
    """Every nn.Linear / nn.Conv2d weight of ``model`` in ``named_parameters`` order (shared weights once)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    layers, seen = [], set()
    for module_name, module in _named_modules(model):
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        if isinstance(module, MASKED_TYPES):
            layout = "masked"
        elif is_torch_pruned(module):
            layout = "torch"
        else:
            layout = "plain"
        attr = "weight_orig" if layout == "torch" else "weight"
        param = module._parameters.get(attr)  # Layer.param without nn.Module.__getattr__ (a hot path)
        param = getattr(module, attr, None) if param is None else param
        if param is None or id(param) in seen:
            continue
        seen.add(id(param))
        layers.append(Layer(_weight_name(module_name), module_name, module, layout))
    return layers


def select_layers(
    model: nn.Module, include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None
) -> list[Layer]:
    """The prunable layers filtered by fnmatch patterns on module (or weight) names.

    ``include`` None means all layers. A pattern that matches no prunable layer is an error (a typo would
    otherwise silently prune the wrong layers).
    """
    layers = all_layers(model)
    names = [layer.name for layer in layers]
    inc = _as_patterns(include, "include")
    exc = _as_patterns(exclude, "exclude")
    for what, pats in (("include", inc), ("exclude", exc)):
        for p in pats or ():
            if not any(matches(p, n) for n in names):
                raise ValueError(f"{what} pattern {p!r} matches no nn.Linear/nn.Conv2d weight; known: {names}")
    if inc is not None:
        layers = [layer for layer in layers if any(matches(p, layer.name) for p in inc)]
    if exc is not None:
        layers = [layer for layer in layers if not any(matches(p, layer.name) for p in exc)]
    return layers


def prunable(
    model: nn.Module, include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None
) -> dict[str, nn.Parameter]:
    """Name -> stored weight Parameter of every nn.Linear / nn.Conv2d (masked or not), filtered by patterns.

    Names are ``named_parameters`` names of the weights ("fc1.weight"); for a module pruned with
    torch.nn.utils.prune the name is still "<module>.weight" and the Parameter is its ``weight_orig``.
    """
    return {layer.name: layer.param for layer in select_layers(model, include, exclude)}


def check_fraction(value, what: str) -> float:
    """A pruning fraction in [0, 1] as a float, or a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what}: fraction must be a number in [0, 1], got {value!r}")
    value = float(value)
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{what}: fraction must be in [0, 1], got {value}")
    return value


def check_finite(weight: torch.Tensor, mask: torch.Tensor | None, where: str) -> None:
    """Raise naming ``where`` when an alive entry of ``weight`` is NaN or infinite (such magnitudes have no rank).

    A finite sum proves every entry finite (8 ms vs ``isfinite().all()``'s 180 ms for 25.5M float32 weights on
    one thread); otherwise the alive entries are checked one by one.
    """
    if not weight.is_floating_point() or bool(torch.isfinite(weight.detach().sum())):
        return
    bad = ~torch.isfinite(weight.detach())
    if mask is not None:
        bad &= mask
    if bool(bad.any()):
        raise ValueError(f"{where}: {int(bad.sum())} alive weights are NaN or infinite; cannot rank magnitudes")
