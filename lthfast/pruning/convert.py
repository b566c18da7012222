"""Convert models between layouts: plain nn.Linear/nn.Conv2d, lthfast masked modules, torch.nn.utils.prune.

State dicts. A masked module's state_dict holds ``weight``, ``bias`` and its bool ``mask``. Masks travel
separately from weights, so:
  * ``dense_state_dict(model)`` gives W ⊙ M under the original keys (no mask keys, no ``weight_orig``): it
    loads with ``strict=True`` into the original model definition;
  * modules made by ``sparsify`` / ``from_torch_prune`` accept a state_dict without ``mask`` keys (e.g. the
    original model's): they keep their current mask and zero the pruned weights after loading.
Every conversion keeps the Parameter objects (so an optimizer built before it keeps working), devices and
dtypes, and the modules' forward/backward hooks.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from lthfast.nn import _CONV_ATTRS, MaskedConv2d, MaskedLinear
from lthfast.pruning.layers import Layer, all_layers, is_torch_pruned, masked_state_keys, select_layers

_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
)  # fmt: skip


def _keep_mask_if_missing(module, state_dict, prefix, *args) -> None:
    """Load pre-hook: a state_dict without ``<prefix>mask`` keeps the module's current mask."""
    if prefix + "weight" in state_dict and prefix + "mask" not in state_dict:
        state_dict[prefix + "mask"] = module.mask


def _zero_pruned_after_load(module, incompatible_keys) -> None:
    """Load post-hook: keep W == W ⊙ M after loading weights."""
    module.apply_mask_()


def _share_hooks(old: nn.Module, new: nn.Module) -> None:
    # The same dict objects, so that handles the user holds still remove their hooks.
    for attr in _HOOK_DICTS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))


def _register_load_hooks(module: nn.Module) -> None:
    module._register_load_state_dict_pre_hook(_keep_mask_if_missing, with_module=True)
    module.register_load_state_dict_post_hook(_zero_pruned_after_load)


def _replace(model: nn.Module, mapping: dict[int, nn.Module]) -> nn.Module:
    """Swap modules (by id) wherever they sit in ``model``; returns the new root."""
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in mapping:
                parent._modules[child_name] = mapping[id(child)]
    return mapping.get(id(model), model)


def _pruned_tensor_names(module: nn.Module) -> list[str]:
    return [h._tensor_name for h in module._forward_pre_hooks.values() if isinstance(h, torch_prune.BasePruningMethod)]


def _untorch_(module: nn.Module) -> torch.Tensor:
    """Undo torch.nn.utils.prune's reparametrization of ``weight`` in place; returns the bool mask."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, torch_prune.BasePruningMethod) and hook._tensor_name == "weight":
            del module._forward_pre_hooks[key]
    orig = module._parameters.pop("weight_orig")
    mask = module._buffers.pop("weight_mask") != 0
    module.__dict__.pop("weight", None)
    module.weight = orig  # the same Parameter object
    return mask


def _masked_from(layer: Layer) -> nn.Module:
    module = layer.module
    mask = _untorch_(module) if layer.layout == "torch" else None
    cls = MaskedLinear if isinstance(module, nn.Linear) else MaskedConv2d
    masked = cls.from_dense(module, mask)
    masked.apply_mask_()
    _share_hooks(module, masked)
    _register_load_hooks(masked)
    return masked


def _check_convertible(layers: list[Layer]) -> None:
    # A plain module too: its pruned bias is a computed attribute, which the masked module would keep as a plain
    # tensor, losing bias_orig (the Parameter) and its mask.
    for layer in layers:
        others = [n for n in _pruned_tensor_names(layer.module) if n != "weight"]
        if others:
            raise ValueError(
                f"{layer.module_name or 'model'}: {others} pruned with torch.nn.utils.prune; lthfast masks weights "
                f"only: call torch.nn.utils.prune.remove(module, name) for those first"
            )


def _exact_type(module: nn.Module) -> bool:
    return type(module) in (nn.Linear, nn.Conv2d)


def sparsify(model: nn.Module, include=None, exclude=None) -> nn.Module:
    """Turn nn.Linear / nn.Conv2d modules into MaskedLinear / MaskedConv2d in place; returns the model.

    ``include`` / ``exclude``: fnmatch patterns (str or list) on fully qualified module names. Weights,
    biases (the same Parameter objects), devices and dtypes are kept; new masks are all alive, except for
    modules pruned with torch.nn.utils.prune, whose ``weight_mask`` becomes the mask. Already-masked modules
    are left alone. Subclasses of nn.Linear / nn.Conv2d (which may have their own forward) are not converted
    (a warning names them); they stay prunable by zeroing. When ``model`` itself is a Linear / Conv2d the
    converted module is returned.
    """
    layers = [layer for layer in select_layers(model, include, exclude) if layer.layout != "masked"]
    skipped = [layer.name for layer in layers if not _exact_type(layer.module)]
    if skipped:
        warnings.warn(f"lthfast.sparsify: not converting subclasses of nn.Linear/nn.Conv2d: {skipped}", stacklevel=2)
    layers = [layer for layer in layers if _exact_type(layer.module)]
    _check_convertible(layers)
    _warn_tied(model, layers)
    return _replace(model, {id(layer.module): _masked_from(layer) for layer in layers})


def _warn_tied(model: nn.Module, layers: list[Layer]) -> None:
    """Name the modules that share a converted weight: layers hold each weight once, so they stay as they are."""
    owner = {id(layer.module.weight): layer.module_name for layer in layers}
    converted = {id(layer.module) for layer in layers}
    tied = [
        f"{name or 'model'} (weight of {owner[id(module.weight)] or 'model'})"
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, nn.Linear | nn.Conv2d)
        and id(module) not in converted
        and id(getattr(module, "weight", None)) in owner
    ]
    if tied:
        warnings.warn(
            f"lthfast.sparsify: not converting modules whose weight is tied to a converted one: {tied}; they compute "
            "with the stored weight, which equals W * M only while pruned weights are zero (lthfast.mask_optimizer "
            "keeps them so)",
            stacklevel=3,
        )


def _plain_from(module: nn.Module) -> nn.Module:
    """A plain nn.Linear / nn.Conv2d sharing ``module``'s Parameters (weights already W ⊙ M)."""
    if isinstance(module, nn.Linear):
        out = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(out)
        out.in_features, out.out_features = module.in_features, module.out_features
    else:
        out = nn.Conv2d.__new__(nn.Conv2d)
        nn.Module.__init__(out)
        for name in _CONV_ATTRS:
            setattr(out, name, getattr(module, name))
    out.weight = module.weight
    out.bias = module.bias
    out.train(module.training)
    _share_hooks(module, out)
    return out


def densify(model: nn.Module) -> nn.Module:
    """Turn every MaskedLinear / MaskedConv2d back into nn.Linear / nn.Conv2d with weight W ⊙ M, in place.

    The weight Parameters are kept (zeroed where pruned, in place). Returns the model (or the new module
    when ``model`` itself is masked).
    """
    mapping = {}
    for layer in all_layers(model):
        if layer.layout == "masked":
            layer.module.apply_mask_()
            mapping[id(layer.module)] = _plain_from(layer.module)
    return _replace(model, mapping)


def dense_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """``model.state_dict()`` with weights as W ⊙ M under their original keys and no mask entries.

    Masked modules lose their ``mask`` key; tensors reparametrized by torch.nn.utils.prune (``<name>_orig`` /
    ``<name>_mask``, of any module: a pruned bias, an nn.Embedding) become ``<name>``. The result loads with
    ``strict=True`` into the original (unpruned) model definition. Tensors are detached copies.
    """
    state = model.state_dict()
    stored = masked_state_keys(model)
    masks = {mask_key for mask_key, _ in stored.values()}
    out = OrderedDict()
    for key, value in state.items():
        if key in masks:
            continue
        if key in stored:
            mask_key, key = stored[key]
            value = torch.where(state[mask_key] != 0, value, torch.zeros((), dtype=value.dtype, device=value.device))
        out[key] = value.detach().clone()
    return out


def from_torch_prune(model: nn.Module) -> nn.Module:
    """Convert modules pruned with torch.nn.utils.prune (``weight_orig`` / ``weight_mask``) to masked modules.

    In place; the ``weight_orig`` Parameter becomes the masked module's ``weight`` (so optimizers keep it),
    ``weight_mask`` its bool ``mask``, and pruned stored weights are zeroed. Only nn.Linear / nn.Conv2d
    with a pruned ``weight`` are converted; a module whose other tensors (e.g. ``bias``) are pruned raises
    before anything changes. Returns the model.
    """
    layers = [layer for layer in all_layers(model) if layer.layout == "torch" and _exact_type(layer.module)]
    _check_convertible(layers)
    return _replace(model, {id(layer.module): _masked_from(layer) for layer in layers})


def to_torch_prune(model: nn.Module) -> nn.Module:
    """Convert masked modules to plain modules reparametrized like torch.nn.utils.prune, in place.

    Each gets ``weight_orig`` (the same Parameter), a ``weight_mask`` buffer (the weight's dtype) and a
    forward pre-hook recomputing ``weight = weight_orig * weight_mask``; ``torch.nn.utils.prune.remove`` and
    ``is_pruned`` work on the result. Returns the model (or the new module when ``model`` itself is masked).
    """
    from lthfast.pruning.torch_compat import reparametrize_

    mapping = {}
    for layer in all_layers(model):
        if layer.layout == "masked":
            layer.module.apply_mask_()
            plain = _plain_from(layer.module)
            reparametrize_(plain, "weight", layer.module.mask.clone())
            mapping[id(layer.module)] = plain
    return _replace(model, mapping)


__all__ = ["sparsify", "densify", "dense_state_dict", "from_torch_prune", "to_torch_prune", "is_torch_pruned"]
