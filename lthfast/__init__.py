"""lthfast: a sparse-accelerated engine for lottery-ticket research in PyTorch."""

__version__ = "0.1.0"

import sys

from lthfast import functional, nn, prune  # noqa: E402
from lthfast._backend import backend, get_backend, set_backend  # noqa: E402
from lthfast.pruning import (  # noqa: E402
    MaskedAdam,
    MaskedAdamW,
    MaskedSGD,
    Masks,
    Snapshot,
    dense_state_dict,
    densify,
    from_torch_prune,
    mask_optimizer,
    prunable,
    sparsify,
    strategies,
    to_torch_prune,
)

# ``import lthfast.strategies`` / ``from lthfast.strategies import magnitude_``: the attribute is also a submodule.
sys.modules[f"{__name__}.strategies"] = strategies

__all__ = [
    "__version__",
    "MaskedAdam",
    "MaskedAdamW",
    "MaskedSGD",
    "Masks",
    "Snapshot",
    "backend",
    "dense_state_dict",
    "densify",
    "from_torch_prune",
    "functional",
    "get_backend",
    "mask_optimizer",
    "nn",
    "prunable",
    "prune",
    "set_backend",
    "sparsify",
    "strategies",
    "to_torch_prune",
]
