"""Drop-in replacements for ``torch.nn.utils.prune``'s unstructured pruning: same layout, fast, no memory growth.

``import lthfast.prune as prune`` instead of ``from torch.nn.utils import prune`` and an existing IMP loop
runs unchanged: modules get the same ``weight_orig`` Parameter, ``weight_mask`` buffer (the weight's dtype)
and forward pre-hook recomputing ``weight = weight_orig * weight_mask``, so code that reads ``module.weight``,
``module.weight_mask``, the state_dict keys, or calls ``prune.remove`` / ``prune.is_pruned`` keeps working.

What differs, and why:
  * the mask is computed by lthfast's global magnitude threshold (``lthfast.threshold``, a radix select in
    C++) instead of concatenating every weight and running ``torch.topk`` over the alive ones;
  * the ``weight_mask`` buffer is updated IN PLACE and each tensor carries one hook (``InPlaceMask``, which
    holds no tensor). torch instead appends a ``CustomFromMask`` holding a full-size mask to a
    ``PruningContainer`` at every round, so its memory grows every round (pytorch/pytorch#49332);
  * NaN / inf scores among alive entries raise (torch ranks them arbitrarily), for float32 / float16 / bfloat16
    scores; float64 scores go through torch's own computation, as torch ranks them;
  * a tensor pruned before is ranked by its current values (``<name>_orig`` where the mask is alive); torch ranks
    ``module.<name>``, the product its forward pre-hook made at the last forward pass or prune. They differ only
    when the optimizer stepped after the last forward pass (a loop that ends on ``opt.step()`` and prunes right
    away): lthfast then ranks the trained weights, torch the weights of one step before.
On tie-free data the masks equal torch's; ties are broken by position (lower flat index of the
concatenation is pruned first), torch's ``topk`` breaks them arbitrarily.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from lthfast.pruning._common import RANKABLE_DTYPES
from lthfast.pruning.layers import check_finite


class InPlaceMask(torch_prune.BasePruningMethod):
    """The forward pre-hook of a tensor whose ``<name>_mask`` lthfast updates in place.

    Holds no tensor (so nothing accumulates). ``compute_mask`` is the identity: the mask lives in the buffer.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, name: str) -> None:
        self._tensor_name = name

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return default_mask


def _has_layout(module: nn.Module, name: str) -> bool:
    return f"{name}_orig" in module._parameters and f"{name}_mask" in module._buffers


def reparametrize_(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Give ``module.<name>`` torch.nn.utils.prune's layout with ``mask`` (bool), in place.

    ``<name>_orig`` is the same Parameter; ``<name>_mask`` a buffer of the parameter's dtype.
    """
    param = module._parameters[name]
    module.register_parameter(f"{name}_orig", param)
    del module._parameters[name]
    module.register_buffer(f"{name}_mask", mask.to(param.dtype))
    setattr(module, name, param * module._buffers[f"{name}_mask"])
    module.register_forward_pre_hook(InPlaceMask(name))


def _check_amount(amount) -> None:
    # Same rules and messages as torch.nn.utils.prune.
    torch_prune._validate_pruning_amount_init(amount)


def _where(module: nn.Module, name: str, index: int) -> str:
    return f"parameters[{index}] ({type(module).__name__}.{name})"


def _gather(parameters, importance_scores) -> list[tuple]:
    """(module, name, where, stored tensor, bool mask, scores) per entry, validated; nothing is modified."""
    if not isinstance(parameters, Iterable):
        raise TypeError("global_unstructured(): parameters is not an Iterable")
    importance_scores = importance_scores if importance_scores is not None else {}
    if not isinstance(importance_scores, dict):
        raise TypeError("global_unstructured(): importance_scores must be of type dict")
    entries = []
    for index, item in enumerate(parameters):
        try:  # any pair, as torch's own ``for module, name in parameters`` takes (lists too)
            module, name = item
        except (TypeError, ValueError):
            module = name = None
        if not isinstance(module, nn.Module) or not isinstance(name, str):
            raise TypeError(f"parameters[{index}]: expected a (module, name) pair, got {item!r}")
        where = _where(module, name, index)
        if _has_layout(module, name):
            stored = module._parameters[f"{name}_orig"]
            mask = module._buffers[f"{name}_mask"] != 0
        elif isinstance(module._parameters.get(name), torch.Tensor):
            stored = module._parameters[name]
            mask = torch.ones_like(stored, dtype=torch.bool)
        else:
            raise AttributeError(f"{where}: the module has no parameter {name!r}")
        scores = importance_scores.get((module, name), stored)
        if scores.shape != stored.shape:
            raise ValueError(f"{where}: importance scores shape {tuple(scores.shape)} != {tuple(stored.shape)}")
        entries.append((module, name, where, stored, mask, scores.detach()))
    return entries


def _check_count(amount: int, alive: int) -> int:
    if amount > alive:
        raise ValueError(f"global_unstructured: amount={amount} exceeds the number of alive parameters={alive}")
    return int(amount)


def _new_masks(entries, pruning_method, kwargs) -> list[torch.Tensor]:
    from lthfast import threshold

    method = pruning_method(**kwargs)
    if method.PRUNING_TYPE != "unstructured":
        raise TypeError(
            'Only "unstructured" PRUNING_TYPE supported for '
            f"the `pruning_method`. Found method {pruning_method} of type {method.PRUNING_TYPE}"
        )
    masks = [e[4] for e in entries]  # new tensors already
    # float64 scores would be ranked in float32 by the threshold (possible new ties): torch's path keeps them exact.
    natively = all(e[5].dtype in RANKABLE_DTYPES for e in entries)
    if type(method) is torch_prune.RandomUnstructured or (type(method) is torch_prune.L1Unstructured and natively):
        count = {"amount": method.amount}  # a float: the threshold computes round(amount * alive) as torch does
        if type(method.amount) is not float:
            alive = sum(int(torch.count_nonzero(m)) for m in masks)
            if isinstance(method.amount, numbers.Integral):
                count = {"k": _check_count(method.amount, alive)}
            else:  # a NumPy or torch scalar: round(amount * alive) in its own arithmetic, as torch computes it
                count = {"k": round(method.amount * alive)}
        if type(method) is torch_prune.L1Unstructured:
            scores = [e[5] for e in entries]
            try:
                threshold.prune_(scores, masks, **count)
            except ValueError as exc:
                if "NaN" in str(exc):  # name the parameter (the threshold names tensor indices)
                    for _, _, where, _, mask, score in entries:
                        check_finite(score, mask, where)
                raise
        else:
            scores = [torch.rand(e[5].shape, dtype=torch.float32, device=e[5].device) for e in entries]
            threshold.prune_(scores, masks, **count)
        return masks
    # Any other unstructured method: torch's own computation over the alive entries (correct, not faster).
    flat_scores = torch.cat([e[5].reshape(-1) for e in entries])
    flat_mask = torch.cat([m.reshape(-1) for m in masks]).to(flat_scores.dtype)
    container = torch_prune.PruningContainer()
    container._tensor_name = method._tensor_name = "temp"
    container.add_pruning_method(method)
    final = container.compute_mask(flat_scores, flat_mask) != 0
    return [part.view_as(m) for part, m in zip(torch.split(final, [m.numel() for m in masks]), masks)]


def _write_(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    if _has_layout(module, name):
        module._buffers[f"{name}_mask"].copy_(mask)
        orig = module._parameters[f"{name}_orig"]
        setattr(module, name, orig * module._buffers[f"{name}_mask"].to(orig.dtype))
    else:
        reparametrize_(module, name, mask)


def global_unstructured(parameters, pruning_method, importance_scores=None, **kwargs) -> None:
    """``torch.nn.utils.prune.global_unstructured`` with the same signature and layout, fast, in place.

    parameters: iterable of (module, name); pruning_method: e.g. ``prune.L1Unstructured`` (fast path, same
    masks as torch on tie-free data), ``prune.RandomUnstructured`` (fast path, its own random draw) or any
    unstructured method (torch's computation); amount (kwarg): float fraction of the alive entries or int
    count. Every entry is validated before any module changes. Masks are updated in place (bool results
    stored in ``<name>_mask`` of the parameter's dtype); ``<name>_orig`` keeps its values, as in torch.
    """
    entries = _gather(list(parameters), importance_scores)
    if not entries:
        return
    if "amount" in kwargs:
        _check_amount(kwargs["amount"])
    masks = _new_masks(entries, pruning_method, kwargs)
    for (module, name, *_), mask in zip(entries, masks):
        _write_(module, name, mask)


def l1_unstructured(module: nn.Module, name: str, amount, importance_scores=None) -> nn.Module:
    """``torch.nn.utils.prune.l1_unstructured``: prune ``amount`` of ``module.<name>``'s alive entries, in place."""
    scores = None if importance_scores is None else {(module, name): importance_scores}
    global_unstructured([(module, name)], torch_prune.L1Unstructured, importance_scores=scores, amount=amount)
    return module


def random_unstructured(module: nn.Module, name: str, amount) -> nn.Module:
    """``torch.nn.utils.prune.random_unstructured`` (fast, in place; a different random draw than torch's)."""
    global_unstructured([(module, name)], torch_prune.RandomUnstructured, amount=amount)
    return module
