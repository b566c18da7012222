"""Pruning API: Masks, strategies, conversions (sparsify / densify / torch.nn.utils.prune), optimizer guard, fused
masked optimizers, Snapshot.

Names of prunable weights are their ``model.named_parameters()`` names ("fc1.weight"); masks are bool tensors
on the weight's device, True = alive. See ``lthfast.pruning.strategies`` for the strategies and
``lthfast.prune`` for the drop-in replacement of ``torch.nn.utils.prune``.
"""

from lthfast.pruning import strategies
from lthfast.pruning.convert import dense_state_dict, densify, from_torch_prune, sparsify, to_torch_prune
from lthfast.pruning.fused_optim import MaskedAdam, MaskedAdamW, MaskedSGD
from lthfast.pruning.layers import is_torch_pruned, prunable
from lthfast.pruning.masks import Masks
from lthfast.pruning.optim import mask_optimizer
from lthfast.pruning.snapshot import Snapshot

__all__ = [
    "MaskedAdam",
    "MaskedAdamW",
    "MaskedSGD",
    "Masks",
    "Snapshot",
    "dense_state_dict",
    "densify",
    "from_torch_prune",
    "is_torch_pruned",
    "mask_optimizer",
    "prunable",
    "sparsify",
    "strategies",
    "to_torch_prune",
]
