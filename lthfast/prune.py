"""Drop-in for ``torch.nn.utils.prune``: ``import lthfast.prune as prune`` and existing IMP code runs unchanged.

``global_unstructured``, ``l1_unstructured`` and ``random_unstructured`` are lthfast's (fast, masks updated in
place, no memory growth over rounds: see ``lthfast.pruning.torch_compat``); everything else is torch's own.
"""

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
