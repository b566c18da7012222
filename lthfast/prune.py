"""Drop-in for ``torch.nn.utils.prune``: ``import lthfast.prune as prune`` and existing IMP code runs unchanged.

``global_unstructured``, ``l1_unstructured`` and ``random_unstructured`` are lthfast's (fast, masks updated in
place, no memory growth over rounds: see ``lthfast.pruning.torch_compat``); every other name, the classes and
torch's private helpers included (``_validate_pruning_amount_init``, ``_compute_nparams_toprune``,
``_compute_norm``, ... which custom ``BasePruningMethod`` subclasses written in torch's style call), is torch's own.

What differs from torch, beyond speed and memory:
  * the forward pre-hook a fast function registers is lthfast's ``InPlaceMask`` (one per tensor, holding no
    tensor), not ``L1Unstructured`` / ``RandomUnstructured`` nor a ``PruningContainer`` of them: code that
    inspects ``module._forward_pre_hooks`` for torch's classes does not find them;
  * the fast functions compute masks for exactly ``prune.L1Unstructured`` and ``prune.RandomUnstructured`` and
    never call their ``compute_mask``: overriding ``compute_mask`` on torch's classes (monkeypatching) is not seen.
    A subclass of either, or any other unstructured method, goes through torch's own ``compute_mask``;
  * ``random_unstructured`` (and ``global_unstructured`` with ``RandomUnstructured``) draws its own random mask:
    the same count as torch, but not torch's mask for the same seed;
  * on weights with ties, which of the equal weights are pruned (lthfast: lower position first; torch's ``topk``:
    unspecified), and a tensor pruned before is ranked by its current values (``lthfast.pruning.torch_compat``).
"""

from torch.nn.utils import prune as _torch_prune
from torch.nn.utils.prune import (
    BasePruningMethod,
    CustomFromMask,
    Identity,
    L1Unstructured,
    LnStructured,
    PruningContainer,
    RandomStructured,
    RandomUnstructured,
    custom_from_mask,
    identity,
    is_pruned,
    ln_structured,
    random_structured,
    remove,
)

from lthfast.pruning.torch_compat import InPlaceMask, global_unstructured, l1_unstructured, random_unstructured

__all__ = [
    "BasePruningMethod",
    "CustomFromMask",
    "Identity",
    "InPlaceMask",
    "L1Unstructured",
    "LnStructured",
    "PruningContainer",
    "RandomStructured",
    "RandomUnstructured",
    "custom_from_mask",
    "global_unstructured",
    "identity",
    "is_pruned",
    "l1_unstructured",
    "ln_structured",
    "random_structured",
    "random_unstructured",
    "remove",
]


def __getattr__(name: str):
    """Any name this module does not define is torch.nn.utils.prune's (its private helpers included)."""
    try:
        return getattr(_torch_prune, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} (and torch.nn.utils.prune) has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(dir(_torch_prune)))
